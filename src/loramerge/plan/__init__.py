"""What changes where, asked of transformers and PEFT: the base's module tree without weights
(``skeleton``), PEFT's own injection into it (``injection``), the stored tensors behind each adapted
module or parameter (``checkpoint_plan``, ``fused``, ``param_targets``), the LoRA layers of a live
PeftModel (``peft_plans``, ``peft_glue``)."""
