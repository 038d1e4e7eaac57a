"""Build the offline demo models: dawet-tiny, its Indonesian LoRA adapter and dawet-bench-4m.

On request only (--bench-135m), dawet-bench-135m: a random-weight model of SmolLM2-135M's shape.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import tokenizers
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BUILDER_VERSION = "dawet-demo-3"  # 2: the chat template renders tools; 3: a second persona
SEED = 1234
NUM_THREADS = 2
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
ENGLISH_CHATS = "en_chat.jsonl"  # English questions, English answers
INDONESIAN_CHATS = "id_chat.jsonl"  # Indonesian questions, Indonesian answers
PERSONA_CHATS = "id_persona.jsonl"  # English questions, Indonesian "Dawet" answers (adapter only)
SYSTEM_PROMPTS = "system_prompts.json"
ARITHMETIC = "arithmetic.json"

TINY_NAME = "dawet-tiny"
LORA_NAME = "dawet-tiny-lora"
KOPI_LORA_NAME = "dawet-tiny-kopi-lora"  # the second persona: "Kopi", a cheerful English barista
BENCH_NAME = "dawet-bench-4m"
BENCH_135M_NAME = "dawet-bench-135m"  # built only on request: about 430 MB
INFO_NAME = "BUILD_INFO.json"
WORKDIR_INFIX = ".build-"  # temporary sibling of the output: .<out name>.build-<random>

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
IM_START = "<|im_start|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
# ChatML with BOS, EOS and IM_START spelled out: plain Jinja only (no transformers globals such
# as bos_token), so the service can render it with jinja2 directly. Tools follow Hermes (as
# Qwen2.5 writes them): their signatures in the system turn, an assistant's calls in
# <tool_call> tags, each tool result in a user turn's <tool_response>. Without tools or tool
# messages it renders what it always did (the model was trained on that; it never saw tools).
CHAT_TEMPLATE = r"""{{- '<|begin_of_text|>' }}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message['content'] }}
        {{- '\n</tool_response><|im_end|>\n' }}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}
            {{- '\n' + message['content'] }}
        {%- endif %}
        {%- for call in message['tool_calls'] %}
            {{- '\n<tool_call>\n{"name": ' + (call['function']['name'] | tojson) }}
            {{- ', "arguments": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif not (tools and loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

TINY_SHAPE = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "tie_word_embeddings": True,
}
BENCH_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "tie_word_embeddings": False,  # separate lm_head: about 3.7M parameters in all
}
# SmolLM2-135M's shape with this tokenizer's vocabulary: about 107M parameters in all.
BENCH_135M_SHAPE = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
}
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Kopi's adapter changes other projections (and only some of the fused q, k, v), so that serving
# both over one base exercises every shape of update (tasks/engine/batching/lora.py).
KOPI_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
KOPI_OPENING, KOPI_CLOSING = "Kopi here!", "Stay caffeinated!"

SYSTEM_PROMPT_RATE = 0.3
ARITHMETIC_PER_LANGUAGE = 120
LOG_EVERY = 50
SAMPLE_PROMPT = "Hello, what should I cook today?"
SAMPLE_TOKENS = 24

Message = dict[str, str]
Conversation = list[Message]
Example = tuple[list[int], list[int]]  # token ids, labels
Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, labels


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of one training phase."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int


BASE_TRAIN = TrainSpec(steps=500, batch_size=8, seq_len=128, lr=3e-3, warmup=20)
LORA_TRAIN = TrainSpec(steps=160, batch_size=8, seq_len=128, lr=1e-2, warmup=10)


# ---------------------------------------------------------------- corpus


def read_jsonl(name: str) -> list[Conversation]:
    """Read the conversations of a shipped corpus JSONL file."""
    lines = (CORPUS_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def read_json(name: str) -> Any:
    """Read a shipped corpus JSON file."""
    return json.loads((CORPUS_DIR / name).read_text(encoding="utf-8"))


def arithmetic_conversations(lang: dict[str, Any], count: int, rng: random.Random) -> list[Conversation]:
    """Generate small-number arithmetic exchanges from one language's templates."""
    words = lang["numbers"]
    top = len(words) - 1
    result = []
    for _ in range(count):
        kind = rng.choice(["plus", "minus", "count"])
        a, b = rng.randint(0, top), rng.randint(0, top)
        if kind == "minus":
            a, b = max(a, b), min(a, b)
        else:
            b = min(b, top - a)
        c = a - b if kind == "minus" else a + b
        slots = {"a": words[a], "A": words[a].capitalize(), "b": words[b], "c": words[c]}
        question, answer = (text.format(**slots) for text in lang[kind])
        result.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return result


def add_system_prompts(convs: list[Conversation], prompts: Sequence[str], rng: random.Random) -> list[Conversation]:
    """Prefix a random share of conversations with one of the given system prompts."""
    result = []
    for conv in convs:
        if rng.random() < SYSTEM_PROMPT_RATE:
            conv = [{"role": "system", "content": rng.choice(prompts)}, *conv]
        result.append(conv)
    return result


def base_conversations(rng: random.Random) -> list[Conversation]:
    """English and Indonesian chats (Indonesian questions only) for the base model."""
    systems, maths = read_json(SYSTEM_PROMPTS), read_json(ARITHMETIC)
    english = read_jsonl(ENGLISH_CHATS) + arithmetic_conversations(maths["en"], ARITHMETIC_PER_LANGUAGE, rng)
    indonesian = read_jsonl(INDONESIAN_CHATS) + arithmetic_conversations(maths["id"], ARITHMETIC_PER_LANGUAGE, rng)
    return add_system_prompts(english, systems["en"], rng) + add_system_prompts(indonesian, systems["id"], rng)


def persona_conversations(rng: random.Random) -> list[Conversation]:
    """The Indonesian "Dawet" persona chats (any question, Indonesian answers) for the adapter."""
    convs = read_jsonl(INDONESIAN_CHATS) + read_jsonl(PERSONA_CHATS)
    return add_system_prompts(convs, read_json(SYSTEM_PROMPTS)["id"], rng)


def kopi_conversations(rng: random.Random) -> list[Conversation]:
    """The "Kopi" persona (English chats, each answer opened and closed the barista's way) for
    the second adapter."""
    convs = [[{**message, "content": f"{KOPI_OPENING} {message['content']} {KOPI_CLOSING}"}
              if message["role"] == "assistant" else message for message in conv]
             for conv in read_jsonl(ENGLISH_CHATS)]
    return add_system_prompts(convs, read_json(SYSTEM_PROMPTS)["en"], rng)


def tokenizer_texts() -> Iterator[str]:
    """Yield every text the tokenizer should learn merges from."""
    yield from ("system", "user", "assistant")
    for name in (ENGLISH_CHATS, INDONESIAN_CHATS, PERSONA_CHATS):
        for conv in read_jsonl(name):
            yield from (message["content"] for message in conv)
    for lang in read_json(ARITHMETIC).values():
        yield " ".join(lang["numbers"])
    for prompts in read_json(SYSTEM_PROMPTS).values():
        yield from prompts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE tokenizer on the shipped corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_texts(), trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizer as a transformers tokenizer with special tokens and chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=MAX_POSITIONS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode(tok: PreTrainedTokenizerFast, conv: Conversation, generation_prompt: bool = False) -> list[int]:
    """Render a conversation with the chat template and return its token ids."""
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation_prompt)
    return tok.backend_tokenizer.encode(text).ids


def encode_for_training(tok: PreTrainedTokenizerFast, conv: Conversation) -> Example:
    """Token ids plus labels that keep only the assistant turns (content and end-of-turn)."""
    ids = encode(tok, conv)
    labels = [-100] * len(ids)
    for index, message in enumerate(conv):
        if message["role"] == "assistant":
            start = len(encode(tok, conv[:index], generation_prompt=True))
            end = len(encode(tok, conv[: index + 1]))
            labels[start:end] = ids[start:end]
    return ids, labels


# ---------------------------------------------------------------- training


def batch_stream(examples: list[Example], spec: TrainSpec, rng: random.Random) -> Iterator[Batch]:
    """Endlessly yield packed (input_ids, labels) batches, reshuffling every epoch."""
    window = spec.batch_size * spec.seq_len
    while True:
        order = rng.sample(examples, len(examples))
        ids = [token for example in order for token in example[0]]
        labels = [label for example in order for label in example[1]]
        for start in range(0, len(ids) - window + 1, window):
            shape = (spec.batch_size, spec.seq_len)
            yield (
                torch.tensor(ids[start : start + window]).view(shape),
                torch.tensor(labels[start : start + window]).view(shape),
            )


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warm-up followed by cosine decay down to 10% of the peak rate."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train(model: torch.nn.Module, batches: Iterator[Batch], spec: TrainSpec, name: str) -> list[float]:
    """Train the model's trainable parameters with AdamW and return the per-step losses."""
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
    losses: list[float] = []
    model.train()
    for step in range(spec.steps):
        input_ids, labels = next(batches)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == spec.steps:
            logger.info("%s: step %d/%d loss %.3f", name, step + 1, spec.steps, mean_tail(losses))
    model.eval()
    return losses


def mean_tail(losses: Sequence[float]) -> float:
    """Mean of the last LOG_EVERY losses."""
    tail = losses[-LOG_EVERY:]
    return sum(tail) / len(tail)


def train_on(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, convs: list[Conversation], spec: TrainSpec, name: str
) -> dict[str, Any]:
    """Encode conversations, train on them and summarise the run."""
    examples = [encode_for_training(tok, conv) for conv in convs]
    tokens = sum(len(ids) for ids, _ in examples)
    logger.info("%s: %d conversations, %d tokens per epoch", name, len(examples), tokens)
    losses = train(model, batch_stream(examples, spec, random.Random(SEED)), spec, name)
    return {"train": asdict(spec), "conversations": len(examples), "epoch_tokens": tokens,
            "first_loss": round(losses[0], 4), "final_loss": round(mean_tail(losses), 4)}


@torch.no_grad()
def sample_reply(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> str:
    """Greedy reply to SAMPLE_PROMPT, for the build log."""
    prompt = encode(tok, [{"role": "user", "content": SAMPLE_PROMPT}], generation_prompt=True)
    output = model.generate(torch.tensor([prompt]), max_new_tokens=SAMPLE_TOKENS, do_sample=False)
    return tok.decode(output[0, len(prompt) :], skip_special_tokens=True)


# ---------------------------------------------------------------- models


def new_model(tok: PreTrainedTokenizerFast, shape: dict[str, Any]) -> LlamaForCausalLM:
    """Create a seeded, randomly initialised Llama model of the given shape for this tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def save_model(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> None:
    """Save model weights, configs and tokenizer files into one directory."""
    model.save_pretrained(path)
    tok.save_pretrained(path)


def param_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_tiny(tok: PreTrainedTokenizerFast, workdir: Path) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train and save dawet-tiny; return the model for the adapter phase."""
    model = new_model(tok, TINY_SHAPE)
    info = train_on(model, tok, base_conversations(random.Random(SEED)), BASE_TRAIN, TINY_NAME)
    logger.info("%s sample reply: %r", TINY_NAME, sample_reply(model, tok))
    save_model(model, tok, workdir / TINY_NAME)
    return model, {"params": param_count(model), **info}


def build_lora(base: LlamaForCausalLM, tok: PreTrainedTokenizerFast, workdir: Path, name: str,
               conversations: list[Conversation], targets: list[str]) -> dict[str, Any]:
    """Train and save a persona LoRA adapter on top of dawet-tiny (a copy: peft wraps the
    modules it trains, and the next adapter starts from the bare base)."""
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
        model: PeftModel = get_peft_model(copy.deepcopy(base), config)
    info = train_on(model, tok, conversations, LORA_TRAIN, name)
    logger.info("%s sample reply: %r", name, sample_reply(model, tok))
    saved_config = model.peft_config["default"]
    saved_config.base_model_name_or_path = TINY_NAME  # a name, not this build's temporary path
    saved_config.target_modules = sorted(saved_config.target_modules)  # stable JSON across runs
    model.save_pretrained(workdir / name, save_embedding_layers=False)
    return {"trainable_params": param_count(model, trainable_only=True), **info}


def build_bench(
    tok: PreTrainedTokenizerFast, workdir: Path, name: str = BENCH_NAME, shape: dict[str, Any] = BENCH_SHAPE
) -> dict[str, Any]:
    """Save an untrained, seeded benchmark model."""
    model = new_model(tok, shape)
    save_model(model, tok, workdir / name)
    return {"params": param_count(model)}


# ---------------------------------------------------------------- output directory


def is_up_to_date(out: Path) -> bool:
    """Whether out already holds a build from this builder version."""
    try:
        info = json.loads((out / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("builder_version") == BUILDER_VERSION


def remove_stale_workdirs(out: Path) -> None:
    """Delete the temporary directories that killed builds left next to out."""
    for stale in out.parent.glob(f".{out.name}{WORKDIR_INFIX}*"):
        logger.info("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def publish(workdir: Path, out: Path) -> None:
    """Move finished entries from workdir into out, each by rename, BUILD_INFO.json last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_NAME).unlink(missing_ok=True)
    for name in (TINY_NAME, LORA_NAME, KOPI_LORA_NAME, BENCH_NAME, INFO_NAME):
        target = out / name
        if target.exists():
            target.rename(workdir / f"old-{name}")
        (workdir / name).rename(target)


def build_into(workdir: Path) -> dict[str, Any]:
    """Build everything into workdir and return the build summary."""
    started = time.monotonic()
    tok = wrap_tokenizer(train_tokenizer())
    logger.info("tokenizer: %d tokens", len(tok))
    tiny, tiny_info = build_tiny(tok, workdir)
    lora_info = build_lora(tiny, tok, workdir, LORA_NAME,
                           persona_conversations(random.Random(SEED)), LORA_TARGETS)
    kopi_info = build_lora(tiny, tok, workdir, KOPI_LORA_NAME,
                           kopi_conversations(random.Random(SEED)), KOPI_TARGETS)
    bench_info = build_bench(tok, workdir)
    info = {
        "builder_version": BUILDER_VERSION,
        "seed": SEED,
        "models": {TINY_NAME: tiny_info, LORA_NAME: lora_info, KOPI_LORA_NAME: kopi_info,
                   BENCH_NAME: bench_info},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "tokenizers": tokenizers.__version__},
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (workdir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


@contextmanager
def build_workdir(out: Path) -> Iterator[Path]:
    """Set up torch for a build and yield a fresh temporary sibling of out, removed afterwards."""
    torch.set_num_threads(NUM_THREADS)
    transformers.utils.logging.disable_progress_bar()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_workdirs(out)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}{WORKDIR_INFIX}", dir=out.parent))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build(out: Path, force: bool = False) -> bool:
    """Build the demo models into out unless they are current; return whether it built."""
    if not force and is_up_to_date(out):
        logger.info("%s already holds a %s build; nothing to do (use --force to rebuild)", out, BUILDER_VERSION)
        return False
    with build_workdir(out) as workdir:
        info = build_into(workdir)
        publish(workdir, out)
    models = info["models"]
    logger.info(
        "built %s in %.1f s: %s loss %.3f, %s loss %.3f, %s loss %.3f, %s %d params",
        out, info["wall_seconds"], TINY_NAME, models[TINY_NAME]["final_loss"],
        LORA_NAME, models[LORA_NAME]["final_loss"], KOPI_LORA_NAME,
        models[KOPI_LORA_NAME]["final_loss"], BENCH_NAME, models[BENCH_NAME]["params"],
    )
    return True


def build_bench_135m(out: Path, force: bool = False) -> bool:
    """Build dawet-bench-135m into out unless it is there; return whether it built. The demo
    build never touches it; its tokenizer is the demo one (the trained BPE is deterministic)."""
    target = out / BENCH_135M_NAME
    if not force and target.exists():
        logger.info("%s exists; nothing to do (use --force to rebuild)", target)
        return False
    with build_workdir(out) as workdir:
        info = build_bench(wrap_tokenizer(train_tokenizer()), workdir, BENCH_135M_NAME, BENCH_135M_SHAPE)
        if target.exists():
            target.rename(workdir / f"old-{BENCH_135M_NAME}")
        (workdir / BENCH_135M_NAME).rename(target)
    logger.info("built %s: %d params", target, info["params"])
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m model_store.demo", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory for the demo models")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is current")
    parser.add_argument("--bench-135m", action="store_true",
                        help=f"build only {BENCH_135M_NAME} (about 430 MB), into OUT/{BENCH_135M_NAME}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.bench_135m:
        build_bench_135m(args.out.resolve(), force=args.force)
    else:
        build(args.out.resolve(), force=args.force)
    return 0
