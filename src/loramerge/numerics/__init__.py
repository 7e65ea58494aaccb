"""Pure tensor math: the LoRA update of each layer kind and its one rounding (``delta``), the tolerance
rule (``tolerance``), and bitsandbytes' formats dequantized and re-quantized exactly
(``quantized``). No files, no models."""
