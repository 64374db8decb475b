"""The toy world and test-size models, apart from the product code.

    world.py     the procedural toy world (icons, bricks, balls, cubes) and its judge (a classifier)
    tiny.py      tiny SD / SDXL / CLIP / ViT models built from configs, and the CLIP tokenizer
    embedded.py  pretraining of the embedded `embedded:toy-world` model on the toy world
    models/      the shipped embedded model (+ its classifier/)

Product code reaches these only through `dreambooth_dora.families.models.resolve_model("embedded:...")`
and the evaluation's toy judge.
"""
