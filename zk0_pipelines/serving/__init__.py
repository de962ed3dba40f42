"""Serving the registry's champion to robots: lerobot's async-inference policy server and an MLflow pyfunc.

Heavy libraries (torch, lerobot, grpc, mlflow) are imported inside the modules that need them.
"""
