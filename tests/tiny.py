"""Tiny random Hugging Face checkpoints for tests.

``make_tiny_checkpoint`` writes a real checkpoint directory (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) of a randomly initialised
Llama-family model small enough to run in milliseconds.  The weights come from a transformers
model built with ``torch.manual_seed(seed)``, then re-randomised so that every parameter
matters (norm weights and biases are not left at their 1 / 0 defaults, attention scores are
not flat), and the output head is scaled by ``logit_scale`` so the next-token distributions are
peaked but not one-hot: draft and target disagree often enough for exactness tests to have power.

The tokenizer is a word-level vocabulary: ids 0, 1, 2 are ``<unk>``, ``<s>`` (BOS) and ``</s>``
(EOS); ids 3, 4, 5, 6 are the chat template's words ``user``, ``assistant``, ``system``, ``:``;
the other ids are short lowercase words (``a`` .. ``z``, then ``w26``, ``w27``, ...).  Text is
split on whitespace; an unknown word maps to ``<unk>``.  Encoding adds no BOS; the chat
template does.
"""

from __future__ import annotations

import math
import pathlib
import string

import torch

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def tiny_words(vocab_size: int) -> list[str]:
    """The tokenizer's vocabulary in id order: the 3 special tokens, then plain words."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    words = [UNK, BOS, EOS, "user", "assistant", "system", ":"][:vocab_size]
    letters = list(string.ascii_lowercase)
    i = 0
    while len(words) < vocab_size:
        words.append(letters[i] if i < len(letters) else f"w{i}")
        i += 1
    return words


def _config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
            num_kv_heads: int, tie_word_embeddings: bool, overrides: dict):
    import transformers

    if arch not in _ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(_ARCHITECTURES)}, got {arch!r}")
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie_word_embeddings,
        architectures=[_ARCHITECTURES[arch]],
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 2 * hidden_size // num_heads  # Qwen3's head_dim is not hidden / heads
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = cls(**kwargs)
    config.dtype = torch.float32
    return config


def _randomize(model: torch.nn.Module, logit_scale: float, tied: bool) -> None:
    """Give every parameter a scale where it visibly changes the logits.

    Linear weights ~ N(0, 1 / fan_in) so activations stay O(1) and attention is not flat;
    norm weights ~ 1 + N(0, 0.1^2); biases ~ N(0, 0.1^2); embeddings ~ N(0, 1); the output
    head (the embedding when tied) scaled so a logit has standard deviation about
    ``logit_scale / 4``.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_(torch.randn_like(param))
            elif param.dim() == 2:
                param.copy_(torch.randn_like(param) / math.sqrt(param.shape[1]))
        head = model.get_output_embeddings().weight  # [V, H]; the embedding itself when tied
        head.mul_(logit_scale / 4.0 / math.sqrt(head.shape[1]) / head.std())


def _write_tokenizer(path: pathlib.Path, tokenizer_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tiny_words(tokenizer_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
    fast.save_pretrained(str(path))


def make_tiny_checkpoint(
    path,
    arch: str = "llama",
    vocab_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    logit_scale: float = 8.0,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    tokenizer_size: int | None = None,
    **config_overrides,
) -> pathlib.Path:
    """Write a random tiny checkpoint directory at ``path`` and return it.

    ``arch`` is one of llama, mistral, qwen2, qwen3.  ``tokenizer_size`` (default
    ``vocab_size``) is the tokenizer's vocabulary: a model whose ``vocab_size`` is larger has
    padded logits (ids >= tokenizer_size are never produced by the tokenizer).
    ``config_overrides`` go to the transformers config (e.g. ``sliding_window=4``,
    ``attention_bias=True``, ``rope_scaling={...}``, ``max_position_embeddings=64``).
    Deterministic for a given seed.
    """
    import transformers

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_size = vocab_size if tokenizer_size is None else tokenizer_size
    if tokenizer_size > vocab_size:
        raise ValueError(f"tokenizer_size {tokenizer_size} exceeds vocab_size {vocab_size}")
    config = _config(arch, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                     tie_word_embeddings, config_overrides)
    model_cls = getattr(transformers, _ARCHITECTURES[arch])
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, logit_scale, tie_word_embeddings)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(str(path))
    _write_tokenizer(path, tokenizer_size)
    return path


def make_tiny_pair(
    tmpdir,
    arch: str = "llama",
    draft_arch: str | None = None,
    vocab_size: int = 32,
    draft_vocab_size: int | None = None,
    target_seed: int = 0,
    draft_seed: int = 1,
    target_kwargs: dict | None = None,
    draft_kwargs: dict | None = None,
    **common,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a target and a draft checkpoint that share one tokenizer; return (target_dir, draft_dir).

    The two differ in weights (different seeds).  ``draft_vocab_size`` > ``vocab_size`` gives
    the draft a padded output head (e.g. 40 logits over the same 32-token tokenizer) so tests
    can check that q is padded / cut to the target's width.  ``common`` goes to both
    ``make_tiny_checkpoint`` calls; ``target_kwargs`` / ``draft_kwargs`` to one each.
    """
    tmpdir = pathlib.Path(tmpdir)
    draft_vocab_size = vocab_size if draft_vocab_size is None else draft_vocab_size
    target = make_tiny_checkpoint(tmpdir / "target", arch=arch, vocab_size=vocab_size,
                                  seed=target_seed, tokenizer_size=vocab_size,
                                  **common, **(target_kwargs or {}))
    draft = make_tiny_checkpoint(tmpdir / "draft", arch=draft_arch or arch,
                                 vocab_size=draft_vocab_size, seed=draft_seed,
                                 tokenizer_size=vocab_size, **common, **(draft_kwargs or {}))
    return target, draft


def _head_key(weights: dict) -> str:
    """Name of the output head in a checkpoint's weights (the embedding when tied)."""
    return "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"


def perturbed_copy(src, dst, noise: float, seed: int = 0) -> pathlib.Path:
    """Copy checkpoint ``src`` to ``dst`` with N(0, (noise x head std)^2) added to the output head.

    noise 0 gives a draft identical to the target (acceptance 1 at equal warping: every proposal
    position is reached); a small noise (0.1 - 0.3) a draft that agrees mostly but still gets
    rejected at every position; a large one a draft that disagrees often.  When embeddings are
    tied the embedding changes too.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    key = _head_key(weights)
    head = weights[key]  # [V, H]
    g = torch.Generator().manual_seed(seed)
    weights[key] = (head + noise * head.std() * torch.randn(head.shape, generator=g)).contiguous()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def boost_token_logit(path, token_id: int, boost: float, contexts: int = 256, seed: int = 0) -> pathlib.Path:
    """Raise ``token_id``'s logit by ``boost`` on average over random contexts, in place.

    The head row of the token gets ``boost x m / |m|^2`` added, m being the mean input of the
    output head over ``contexts`` random 8-token sequences; e.g. an EOS that is likely from the
    first completion token on (min_new_tokens and stop tests need one).  Returns ``path``.
    """
    import transformers
    from safetensors.torch import load_file, save_file

    path = pathlib.Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (contexts, 8), generator=g)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    mean = seen[0].reshape(-1, seen[0].shape[-1]).mean(dim=0)  # [H]
    weights = load_file(str(path / "model.safetensors"))
    key = _head_key(weights)
    weights[key][token_id] += boost * mean / mean.dot(mean)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
