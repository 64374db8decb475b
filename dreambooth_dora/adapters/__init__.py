"""The adapters: DoRA / LoRA layers and how they get into a model and out to a file.

    dora.py     the DoRA / LoRA layer (the math contract: shapes, the detached norm, merge)
    fused.py    the fused forward of a DoRA linear layer (one matmul chain, autograd by hand)
    inject.py   putting layers on a model's targets by module name; their parameters by role;
                state dicts; merge; enable / disable
    file.py     the adapter file (diffusers layout + our metadata): save, read, load into a pipeline
    pivotal.py  pivotal tuning's new tokens: training rows, the embeddings file, web UI files

Family-free: nothing here knows which model it adapts (the file's part prefixes come from the
family of the pipeline it is loaded into).
"""
