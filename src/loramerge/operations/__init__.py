"""The public operations, one module each: merge, unmerge and verify in memory and on checkpoints,
training rounds, the Hub, the benchmark."""
