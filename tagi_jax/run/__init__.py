"""The pipeline of stages: the run-config schema, stage tables, objectives, stage starts and work directories."""
