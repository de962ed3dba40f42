"""Partitions: one dynamic partition per dataset id of the registry (or found by the sensors)."""

from __future__ import annotations

import dagster as dg

SO100_DATASETS = dg.DynamicPartitionsDefinition(name="so100_datasets")
