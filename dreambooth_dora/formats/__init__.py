"""Formats: the adapter as other programs read it.

    consumers.py  how LyCORIS / PEFT / diffusers, ComfyUI, Forge and A1111 apply a kohya file
    export.py     kohya / LyCORIS files (DoRA, full, SVD LoRA), fused pipelines, web UI embeddings
    info.py       `dreambooth-dora info`: what a file is and where it loads
    verify.py     `dreambooth-dora verify`: a file under each consumer's rule against our own merge
"""
