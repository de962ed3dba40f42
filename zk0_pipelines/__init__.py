"""zk0_pipelines: federated SmolVLA fine-tuning across SO-100 datasets."""
