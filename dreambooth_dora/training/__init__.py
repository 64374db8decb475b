"""Training: from settings to an adapter file.

    config.py       the settings (TrainConfig), YAML + flags, validated in one place
    data.py         subject / class images, captions, masks; batches keyed by (seed, position)
    buckets.py      aspect-ratio buckets (kohya's rule)
    prompts.py      captions to the family's text conditioning, cached where the encoders are frozen
    losses.py       the diffusion loss as a pure function (weights, masks, the prior split)
    ema.py          an exponential moving average of the adapter
    prior.py        class images for prior preservation, drawn once
    validation.py   validation grids during training
    runs.py         the run folder: new, resumed or refused, and its lock
    checkpoints.py  checkpoints: atomic, rotated, resumable
    sharding.py     FSDP2 over processes: the denoiser sharded, adapter and optimizer gathered for files
    model_card.py   the README beside the adapter
    loop.py         `train()`: setup, then one step at a time (the model family supplies the loss inputs)

The model family (`families/`) answers every "which model is this" question.
"""
