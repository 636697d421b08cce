"""Hugging Face Llama directories: out (``maskscale export --format hf``) and in (``init=hf:DIR``).

Why: a model that only maskscale can load is a dead end. The ARM is a Llama exactly
(pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases, untied head), so it exports as a
``transformers`` ``LlamaForCausalLM`` directory that ``AutoModelForCausalLM`` and lm-eval's
``--model hf`` load as is. The MDM is the same weights with bidirectional attention and a mask
token; transformers has no such model, so its directory carries a small modelling file
(``trainer/hf_modeling_mdm.py``, loaded with ``trust_remote_code=True`` as LLaDA's is).
The other way, a local Llama directory (ours, or any written by ``save_pretrained``) starts a
pretraining or SFT run, after its shapes were checked field by field against the model config.

Layout facts the conversion relies on (``trainer/model.py``):

* ``attn.qkv`` is ``[q; k; v]`` by rows, heads contiguous within each: its thirds are
  ``q_proj``/``k_proj``/``v_proj`` unchanged. maskscale's RoPE already rotates halves
  (``rotate_half``), as HF Llama's does, so no row permutation is needed.
* ``mlp.gate_up`` is ``[gate; up]`` by rows (``chunk(2)``: gate first).
* The input embedding has ``vocab_size + 1`` rows, the last being the MDM mask token. An ARM
  export drops it (an ARM never reads it; HF Llama's embedding and head have equal rows);
  an MDM export keeps it. Coming in from a plain Llama, the mask row is drawn like
  maskscale's init (N(0, 2/(5d)), seeded), which an ARM ignores and an MDM learns.

``transformers`` is an optional extra (``pip install maskscale[hf]``): only the export needs it
(``LlamaConfig`` writes config.json in the installed version's format, the tokenizer files come
from ``PreTrainedTokenizerFast``), imported inside functions. Reading a directory for
``init=hf:DIR`` needs only safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.configlib import ConfigError, to_dict
from trainer.checkpoint import CheckpointRef, consolidated_state_dict
from trainer.model import ModelConfig

HF_PREFIX = "hf:"
MDM_MODEL_TYPE = "maskscale_mdm"
MODELING_FILE = "modeling_maskscale_mdm.py"
MODELING_SOURCE = Path(__file__).with_name("hf_modeling_mdm.py")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def is_hf_init(init: str) -> bool:
    return init.startswith(HF_PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "transformers is not installed; `pip install maskscale[hf]` (or "
            "`pip install 'transformers>=4.45,<6'`) to write Hugging Face directories"
        ) from None
    return transformers


# ----------------------------------------------------------------------------- weight names


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, mdm: bool) -> dict:
    """maskscale names -> Llama names (fp32, contiguous); ARM drops the mask embedding row."""
    d, f = cfg.d_model, cfg.ffn
    embed = state["embed.weight"]
    out = {"model.embed_tokens.weight": embed if mdm else embed[: cfg.vocab_size]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split(d, dim=0)
        gate, up = state[src + "mlp.gate_up.weight"].split(f, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
        })  # fmt: skip
    out["model.norm.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["head.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def mask_row(d_model: int, seed: int) -> torch.Tensor:
    """A fresh mask-token embedding row, drawn as ``Transformer.reset_parameters`` draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(d_model).normal_(0.0, math.sqrt(2.0 / (5.0 * d_model)), generator=gen)


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig, seed: int) -> dict:
    """Llama names -> maskscale names (fp32); a V-row embedding gains a seeded mask row."""
    out: dict[str, torch.Tensor] = {}
    embed = hf["model.embed_tokens.weight"].float()
    if embed.shape[0] == cfg.vocab_size:
        embed = torch.cat([embed, mask_row(cfg.d_model, seed)[None]])
    out["embed.weight"] = embed
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn = [hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"]
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "attn.qkv.weight"] = torch.cat(attn)
        out[dst + "attn.out.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "mlp_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        gate_up = [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        out[dst + "mlp.gate_up.weight"] = torch.cat(gate_up)
        out[dst + "mlp.down.weight"] = hf[src + "mlp.down_proj.weight"]
    out["norm.weight"] = hf["model.norm.weight"]
    out["head.weight"] = hf["lm_head.weight"]
    return {k: v.float().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- reading a dir


@dataclass
class HFDir:
    """A local Hugging Face Llama directory (config.json + safetensors weights)."""

    path: Path
    config: dict

    @classmethod
    def open(cls, init: str) -> HFDir:
        """``hf:DIR`` (or DIR) -> the directory, with a clear error when it is not one."""
        path = Path(init.removeprefix(HF_PREFIX)).expanduser()
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(
                f"init={init}: {config} not found; pass hf:DIR with a local Hugging Face model "
                "directory (config.json + model.safetensors, e.g. from save_pretrained)"
            )
        data = json.loads(config.read_text())
        kind = data.get("model_type")
        if kind not in ("llama", MDM_MODEL_TYPE):
            raise ConfigError(
                f"init={init}: {config} has model_type={kind!r}; only Llama models "
                f"(model_type llama, or a maskscale MDM export) have maskscale's architecture"
            )
        if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
            raise ConfigError(
                f"init={init}: no {WEIGHTS} (or {WEIGHTS_INDEX}) in {path}; save the model "
                "with save_pretrained(..., safe_serialization=True)"
            )
        return cls(path, data)

    @property
    def family(self) -> str | None:
        """mdm for a maskscale MDM export; None for a Llama (any objective may start from it)."""
        return "mdm" if self.config["model_type"] == MDM_MODEL_TYPE else None

    @property
    def vocab_size(self) -> int | None:
        """Real tokens (output rows): an MDM export's config counts the mask token too."""
        v = self.config.get("vocab_size")
        return v - 1 if self.family == "mdm" and isinstance(v, int) else v

    @property
    def tokenizer(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None

    def rope(self) -> tuple[float, str | None]:
        """(rope theta, rope type or scaling other than the default), across config versions."""
        c = self.config
        params = c.get("rope_parameters") or {}
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = c.get("rope_scaling") or {}
        kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        return float(theta), None if kind in (None, "default") else kind

    def model_config(self) -> ModelConfig:
        """The maskscale shape of this directory (what SFT from it uses)."""
        c = self.config
        d, ffn = c["hidden_size"], c["intermediate_size"]
        cfg = ModelConfig(
            n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"],
            d_model=d,
            ffn_hidden=None if ffn == 4 * d else ffn,
            vocab_size=self.vocab_size,
            seq_len=c.get("max_position_embeddings", 2048),
            rope_base=self.rope()[0],
            norm_eps=c.get("rms_norm_eps", 1e-6),
        )
        self.check(cfg, where="")
        return cfg

    def check(self, cfg: ModelConfig, where: str) -> None:
        """ConfigError naming the first field where this directory and ``cfg`` differ.

        ``where`` says where ``cfg`` came from (e.g. "preset tiny-1M"), for the message.
        seq_len may differ (rotary positions have no weights)."""
        c, theta_kind = self.config, self.rope()
        pairs = [
            ("num_hidden_layers", c.get("num_hidden_layers"), "n_layer", cfg.n_layer),
            ("num_attention_heads", c.get("num_attention_heads"), "n_head", cfg.n_head),
            ("hidden_size", c.get("hidden_size"), "d_model", cfg.d_model),
            ("intermediate_size", c.get("intermediate_size"), "ffn_hidden", cfg.ffn),
            ("vocab_size", self.vocab_size, "vocab_size", cfg.vocab_size),
            ("rope_theta", theta_kind[0], "rope_base", cfg.rope_base),
            ("rms_norm_eps", c.get("rms_norm_eps", 1e-6), "norm_eps", cfg.norm_eps),
        ]
        for hf_key, hf_value, key, value in pairs:
            if hf_value != value:
                raise ConfigError(
                    f"model.{key}: init=hf:{self.path} has {hf_key}={hf_value!r} but the model "
                    f"config{' (' + where + ')' if where else ''} has {key}={value!r}; pass "
                    f"model_overrides.{key}={hf_value} or a preset with that shape"
                )
        heads = c.get("num_attention_heads")
        fixed = [
            ("num_key_value_heads", c.get("num_key_value_heads", heads), heads,
             "grouped-query attention; maskscale has one key/value head per query head"),
            ("head_dim", c.get("head_dim", cfg.head_dim), cfg.head_dim,
             "a head width other than hidden_size / num_attention_heads"),
            ("tie_word_embeddings", c.get("tie_word_embeddings", False), False,
             "maskscale's input embedding and output head are separate matrices"),
            ("rope_type", theta_kind[1], None, "maskscale's RoPE has no scaling"),
            ("attention_bias", c.get("attention_bias", False), False, "maskscale has no biases"),
            ("mlp_bias", c.get("mlp_bias", False), False, "maskscale has no biases"),
            ("hidden_act", c.get("hidden_act", "silu"), "silu", "maskscale's MLP is SwiGLU"),
        ]  # fmt: skip
        for hf_key, hf_value, wanted, why in fixed:
            if hf_value != wanted:
                raise ConfigError(
                    f"init=hf:{self.path}: {hf_key}={hf_value!r} is not supported ({why}); "
                    f"maskscale needs {hf_key}={wanted!r}"
                )

    def check_tokenizer(self, tokenizer: Path) -> None:
        """The directory's tokenizer (if it has one) must give the corpus's ids."""
        if self.tokenizer is None:
            return
        from tokenizers import Tokenizer

        mine, theirs = (
            Tokenizer.from_file(str(p)).get_vocab() for p in (tokenizer, self.tokenizer)
        )
        if mine != theirs:
            raise ConfigError(
                f"init=hf:{self.path}: its tokenizer.json maps tokens to other ids than "
                f"{tokenizer} (the corpus's); build the corpus with this model's tokenizer "
                f"(tokenizer.path={self.tokenizer})"
            )

    def raw_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the directory's safetensors files, by Llama name."""
        from safetensors.torch import load_file

        if (self.path / WEIGHTS).is_file():
            return load_file(str(self.path / WEIGHTS))
        index = json.loads((self.path / WEIGHTS_INDEX).read_text())
        out: dict[str, torch.Tensor] = {}
        for name in sorted(set(index["weight_map"].values())):
            out.update(load_file(str(self.path / name)))
        return out

    def state_dict(self, cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
        """fp32 maskscale weights for ``cfg`` (checked first); ConfigError on a missing or
        misshapen tensor, naming it."""
        self.check(cfg, where="")
        raw = self.raw_state()
        try:
            state = from_hf_state(raw, cfg, seed)
        except KeyError as e:
            raise ConfigError(f"init=hf:{self.path}: weight {e.args[0]} missing") from None
        embed = raw["model.embed_tokens.weight"].shape[0]
        if embed not in (cfg.vocab_size, cfg.vocab_size + 1):
            raise ConfigError(
                f"init=hf:{self.path}: model.embed_tokens.weight has {embed} rows for "
                f"vocab_size={cfg.vocab_size}"
            )
        return state

    def eos_id(self) -> int | None:
        """EOS as the tokenizer files name it (tokenizer_config.json's eos_token looked up in
        tokenizer.json), else config.json's eos_token_id: ``save_pretrained`` of a bare
        LlamaConfig records LlamaConfig's default id 2 whatever the tokenizer says."""
        config = self.path / "tokenizer_config.json"
        if self.tokenizer is not None and config.is_file():
            from tokenizers import Tokenizer

            token = json.loads(config.read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            found = Tokenizer.from_file(str(self.tokenizer)).token_to_id(token) if token else None
            if found is not None:
                return found
        eos = self.config.get("eos_token_id")
        return eos if isinstance(eos, int) else None

    def info(self) -> dict:
        """What SFT records of its init (the export config.json stand-in)."""
        cfg = self.model_config()
        eos = self.eos_id()
        return {
            "model": to_dict(cfg),
            "objective": self.family,
            "causal": self.family != "mdm",
            "mask_id": cfg.mask_id,
            "mdm_eps": self.config.get("mdm_eps"),
            "eos_id": eos,
            "step": self.config.get("maskscale", {}).get("step"),
            "format": "hf",
        }


def check_pretrain_init(cfg, model_cfg: ModelConfig, manifest: dict) -> None:
    """Pretraining from ``init=hf:DIR``: the directory's shapes must be ``model_cfg``'s (the
    preset with ``model_overrides`` and the corpus's vocab), its tokenizer the corpus's, and
    an MDM export can only continue as an MDM."""
    hf = HFDir.open(cfg.init)
    where = f"preset {cfg.model}" + (
        f" with model_overrides {cfg.model_overrides}" if cfg.model_overrides else ""
    )
    hf.check(model_cfg, where)
    if hf.family == "mdm" and cfg.objective != "mdm":
        raise ConfigError(
            f"init={cfg.init} is a masked diffusion model (bidirectional) but "
            f"objective={cfg.objective}; pass objective=mdm or start from a Llama (ARM)"
        )
    tokenizer = Path(cfg.corpus) / manifest["tokenizer"].get("path", "tokenizer.json")
    if tokenizer.is_file():
        hf.check_tokenizer(tokenizer)


# ----------------------------------------------------------------------------- export


def export_hf(
    ref: CheckpointRef, out_dir: str | Path, tokenizer: Path, run_dir: Path | None = None
) -> Path:
    """Write a Hugging Face directory of checkpoint ``ref`` (its fp32 master weights) to
    ``out_dir``; ``run_dir`` (default: two levels above the checkpoint) supplies the
    ``eval ppl`` results of this step for the model card."""
    run_dir = ref.path.parents[1] if run_dir is None else Path(run_dir)
    meta = dict(ref.meta, checkpoint=str(ref.path))
    state = consolidated_state_dict(ref)
    return write_hf_dir(out_dir, state, meta, tokenizer, ppl_losses(run_dir, ref))


def write_hf_dir(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    meta: dict,
    tokenizer: Path,
    ppl: dict | None = None,
) -> Path:
    """A Hugging Face directory (atomically: written beside ``out_dir``, then renamed) of the
    maskscale weights ``state`` with checkpoint ``meta`` (model, objective, eos_id, ...).

    ARM: ``LlamaForCausalLM``; MDM: ``MaskscaleMDMForMaskedLM`` (modelling file copied in).
    Both: config.json, model.safetensors (fp32), generation_config.json, tokenizer files
    and README.md (model card).
    """
    from safetensors.torch import save_file

    cfg = ModelConfig(**meta["model"])
    mdm = meta.get("objective") == "mdm"
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"{tokenizer}: the run's tokenizer.json is missing")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    eos_id = meta.get("eos_id")
    eos = _write_tokenizer(tmp, Path(tokenizer), eos_id, cfg.seq_len)
    save_file(to_hf_state(state, cfg, mdm), str(tmp / WEIGHTS), metadata={"format": "pt"})
    provenance = _provenance(meta)
    if mdm:
        _write_mdm_config(tmp, cfg, meta, eos_id, provenance)
    else:
        _write_arm_config(tmp, cfg, eos_id, provenance)
    (tmp / "README.md").write_text(model_card(provenance, cfg, mdm, eos, ppl, out.name))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def _write_tokenizer(out: Path, tokenizer: Path, eos_id: int | None, seq_len: int) -> str | None:
    """tokenizer.json + tokenizer_config.json (+ special tokens) by transformers' own writer.
    EOS is also the padding token (maskscale pads with EOS); no BOS is added."""
    transformers = _transformers()
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(tokenizer)).id_to_token(eos_id) if eos_id is not None else None
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer), eos_token=eos, pad_token=eos, model_max_length=seq_len
    )
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"  # the class every transformers version has
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(tokenizer, out / "tokenizer.json")  # byte for byte: same sha256 as the run's
    return eos


def _provenance(meta: dict) -> dict:
    """What the run was: objective, step, tokens, N, FLOPs (6 N D), corpus and its manifest."""
    tokens, n = meta.get("tokens"), meta.get("n_params")
    corpus = meta.get("corpus")
    manifest_sha = meta.get("corpus_manifest_sha256")
    if manifest_sha is None and corpus and (Path(corpus) / "manifest.json").is_file():
        manifest_sha = hashlib.sha256((Path(corpus) / "manifest.json").read_bytes()).hexdigest()
    return {
        "objective": meta.get("objective"),
        "preset": meta.get("preset"),
        "step": meta.get("step"),
        "tokens": tokens,
        "n_params": n,
        "flops": 6.0 * n * tokens if tokens is not None and n is not None else None,
        "corpus": corpus,
        "corpus_manifest_sha256": manifest_sha,
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "mdm_eps": meta.get("mdm_eps"),
        "checkpoint": meta.get("checkpoint"),
    }


def _write_arm_config(out: Path, cfg: ModelConfig, eos_id: int | None, provenance: dict) -> None:
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.maskscale = provenance
    config.save_pretrained(str(out))
    generation = transformers.GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id)
    generation.save_pretrained(str(out))


def _write_mdm_config(
    out: Path, cfg: ModelConfig, meta: dict, eos_id: int | None, provenance: dict
) -> None:
    """config.json by hand (the config class lives in the copied modelling file)."""
    module = MODELING_FILE.removesuffix(".py")
    config = {
        "architectures": ["MaskscaleMDMForMaskedLM"],
        "auto_map": {
            "AutoConfig": f"{module}.MaskscaleMDMConfig",
            "AutoModel": f"{module}.MaskscaleMDMForMaskedLM",
            "AutoModelForMaskedLM": f"{module}.MaskscaleMDMForMaskedLM",
        },
        "model_type": MDM_MODEL_TYPE,
        "vocab_size": cfg.vocab_size + 1,  # embedding rows: the real tokens and the mask
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "max_position_embeddings": cfg.seq_len,
        "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps,
        "mask_token_id": cfg.mask_id,
        "mdm_eps": meta.get("mdm_eps"),
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "maskscale": provenance,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(MODELING_SOURCE, out / MODELING_FILE)
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "mask_token_id": cfg.mask_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def ppl_losses(run_dir: Path, ref: CheckpointRef) -> dict | None:
    """``maskscale eval ppl`` results of this checkpoint's step, if the run has them: the
    export's (RUN/eval/ppl.json) or the checkpoint's (RUN/eval/<tag>/ppl.json)."""
    for path in (run_dir / "eval" / ref.tag / "ppl.json", run_dir / "eval" / "ppl.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("step") == ref.step and result.get("splits"):
            return result
    return None


def model_card(
    prov: dict, cfg: ModelConfig, mdm: bool, eos: str | None, ppl: dict | None, name: str
) -> str:
    """README.md: provenance, shape, losses and how to load, score and sample the model."""
    from trainer.hf_card import render_card

    return render_card(prov, to_dict(cfg), mdm, eos, ppl, name)


# ----------------------------------------------------------------------------- back to maskscale


def hf_to_export(hf_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A maskscale export (model.safetensors, config.json, tokenizer.json) of a Hugging Face
    Llama or maskscale-MDM directory: what ``maskscale eval ppl|gen|harness`` load."""
    from safetensors.torch import save_file

    hf = HFDir.open(str(hf_dir))
    cfg = hf.model_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf.state_dict(cfg, seed), str(out / "model.safetensors"))
    prov = hf.config.get("maskscale", {})
    info = {**{k: prov.get(k) for k in ("step", "tokens", "n_params", "corpus", "preset")}}
    info.update(hf.info())
    info["objective"] = hf.family or prov.get("objective") or "arm"
    info["causal"] = info["objective"] == "arm"
    info["tokenizer_sha256"] = prov.get("tokenizer_sha256")
    info["format"] = "maskscale-export-v1"
    info["checkpoint"] = str(hf.path)
    (out / "config.json").write_text(json.dumps(info, indent=2))
    if hf.tokenizer is not None:
        shutil.copyfile(hf.tokenizer, out / "tokenizer.json")
    return out
