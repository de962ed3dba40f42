-- One server, two databases: Dagster's instance and MLflow's tracking + registry store.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
