"""The walt-export runtime: runs an exported cascade without PyTorch (numpy, pydantic; heavy libraries lazily).

Holds so far the prompt tokenizers (`runtime.text_tokenizer`); runners, scheduler and the cascade come next.
Nothing under `runtime/` imports torch.
"""
