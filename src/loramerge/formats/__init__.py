"""What is read from and written to disk: safetensors checkpoints read and written one tensor at a
time, PEFT adapter directories, receipts, lineage records, atomic output directories, Hub downloads.
Everything read here is untrusted: names stay inside their directory (``confine``)."""
