"""Local Hugging Face T5 directories built on the fly (nothing is downloaded)."""

from pathlib import Path

WORDS = ["a", "cat", "dog", "running", "in", "the", "park", "video", "of"]


def write_tokenizer_json(directory: Path) -> Path:
    """A T5-style Unigram tokenizer.json: <pad>=0, </s>=1, <unk>=2, then letters and a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [(ch, -5.0) for ch in "\u2581abcdefghijklmnopqrstuvwxyz,."]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_t5_directory(directory: Path, feed_forward_proj="gated-gelu", d_model=32, seed=0, **overrides):
    """A T5EncoderModel saved with save_pretrained (config.json + model.safetensors) and a tokenizer.json."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj=feed_forward_proj, **overrides)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():  # T5's default init leaves layer norms at 1: perturb them so the test sees them
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    write_tokenizer_json(directory)
    return model
