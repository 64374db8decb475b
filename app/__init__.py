"""The Gradio comparison app (base | LoRA | DoRA side by side)."""
