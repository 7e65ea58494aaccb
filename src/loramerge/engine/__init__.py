"""Running a plan over weights: tensor by tensor through a checkpoint (``checkpoint_stream``) or over a
live model's parameters (``inmemory_common``), each tensor checked as it is merged."""
