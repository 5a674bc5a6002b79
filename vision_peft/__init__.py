"""vision_peft: adapt frozen pretrained vision and vision-language backbones with parameter-efficient tuning.

This top-level module stays import-light (no torch) so the torch-free runtime ``vision_peft.deploy`` can be
used on machines that only have onnxruntime, numpy, Pillow and tokenizers.
"""

__version__ = "0.1.0"
