"""The model as GPTQ sees it: its decoder layers and target Linears (layers.py), each layer's inputs
(capture.py), and the hooks that sum each target's XᵀX (hooks.py)."""
