"""tta: test-time adaptation for vision models.

Online, batch-by-batch adaptation of any timm / torchvision classifier or open_clip model, with
interchangeable sample-selection policies (EATA, DeYO, ADTE, wisdom of crowds, DiffTPT).
"""
__version__ = "0.1.0"
