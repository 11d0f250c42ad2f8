"""Tiny random-weight backbones built from configs, and a word-level tokenizer: no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "the", "a", "an", "and", "or", "but", "not", "no", "is", "was", "it", "this", "that", "of", "to", "in", "on",
    "for", "with", "as", "at", "by", "from", "very", "good", "great", "bad", "awful", "terrible", "wonderful",
    "fine", "movie", "film", "plot", "acting", "story", "boring", "fun", "funny", "sad", "happy", "love", "hate",
    "loved", "hated", "best", "worst", "dull", "brilliant", "mess", "masterpiece", "what", "sentiment", "sentence",
    "print", "negative", "positive", "answer", "category", "question", "who", "where", "when", "how", "many", "why",
    "world", "sports", "business", "technology", "team", "game", "market", "stock", "company", "phone", "software",
    "won", "lost",
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)) + ["?", "'", ".", ",", "!"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", mask_token="<mask>")


FAMILIES = {
    "gemma3_text": dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                        final_logit_softcapping=30.0),
    "llama": {},
    "qwen2": {},
    "mistral": dict(sliding_window=4),
}


def tiny_causal_lm(family: str = "gemma3_text", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig

    torch.manual_seed(seed)
    vocab_size = len(tiny_tokenizer())
    config = AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **FAMILIES[family],
    )
    if family != "gemma3_text":
        config.head_dim = 16
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_backbone(directory: Path, family: str = "gemma3_text", layers: int = 4) -> Path:
    """A loadable model directory, as a user's local checkpoint would be."""
    tiny_causal_lm(family, layers).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


MASKED_FAMILIES = ("bert", "roberta")


def tiny_masked_lm(family: str = "roberta", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family, vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=300, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        type_vocab_size=1,
    )
    return AutoModelForMaskedLM.from_config(config).eval()


def save_tiny_masked_lm(directory: Path, family: str = "roberta") -> Path:
    model = tiny_masked_lm(family)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_t5(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tiny_tokenizer()), d_model=32, d_kv=16, d_ff=64, num_layers=layers,
                      num_decoder_layers=layers, num_heads=2, pad_token_id=0, eos_token_id=2,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def save_tiny_t5(directory: Path) -> Path:
    tiny_t5().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
