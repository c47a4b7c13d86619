"""int8: the saved format and planned sizes (int8.py, torch-free), the checks before launch
(checks.py), post-training quantization (ptq.py), quantization-aware training's prepare and
convert (qat.py), and fp8 training's float8 linears (fp8.py).
"""
