"""The real vLLM engine (CPU build) on a tiny random Qwen3-VL: install, model, launch."""
