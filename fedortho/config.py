"""Run configuration: one dataclass, one place for every setting.

Flower run configs use hyphenated keys (``clients-per-round``); the dataclass uses the
Python spelling (``clients_per_round``). ``RunConfig.from_mapping`` accepts either and
rejects unknown keys and ill-typed values with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from fedortho import rules
from fedortho.optim import EXACT_CAPABLE, OPTIMIZERS

PARTITIONINGS = ("dirichlet", "iid")
HEAD_INITS = ("random", "zero-shot")
LOGGERS = ("tensorboard", "mlflow")
EMBEDDED_MODEL = "all-minilm-l6-v2"
EMBEDDED_DATASET = "rotten-tomatoes"


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range."""


@dataclass
class RunConfig:
    # federation
    strategy: str = field(default="fedsvd", metadata={"help": "aggregation rule: " + " | ".join(rules.names())})
    rounds: int = field(default=8, metadata={"help": "federated rounds"})
    clients: int = field(default=10, metadata={"help": "number of clients (data partitions)"})
    clients_per_round: int = field(default=10, metadata={"help": "clients sampled each round"})
    svd_period: int = field(default=1, metadata={"help": "fedsvd: refactorize every N rounds"})
    min_clients: int = field(default=1, metadata={"help": "a round in which fewer sampled clients succeed stops the run (resumable)"})
    fail_rate: float = field(default=0.0, metadata={"help": "fault injection: share of client training calls that fail on purpose (seeded)"})
    # local training
    local_steps: int = field(default=3, metadata={"help": "optimizer steps per client round"})
    batch_size: int = field(default=32, metadata={"help": "expected (Poisson) batch size"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adamw | auon | hybrid-auon | muon | normuon | root"})
    orthogonalize: str = field(default="newton-schulz", metadata={"help": "muon, normuon, root: newton-schulz (five quintic steps) | exact (the polar factor, one r x r eigendecomposition)"})
    optimizer_state: str = field(default="reset", metadata={"help": "reset | keep: the client's optimizer state across rounds"})
    lr: float = field(default=0.0, metadata={"help": "client learning rate (0: the optimizer's default, sgd 0.5)"})
    head_lr: float = field(default=0.0, metadata={"help": "orthogonal optimizers: SGD rate of the head (0: 0.5)"})
    train_precision: str = field(default="float32", metadata={"help": "client training: float32 | bfloat16 (the frozen base model under autocast; the trainable tensors, per-sample gradients, clipping, noise and optimizer stay float32)"})
    # privacy
    epsilon: float = field(default=6.0, metadata={"help": "target epsilon per client for the whole run (inf: no DP)"})
    delta: float = field(default=1e-5, metadata={"help": "target delta"})
    clip: float = field(default=2.0, metadata={"help": "per-sample gradient clipping norm"})
    # user-level privacy (fedortho.userdp): a client's whole update is the unit
    user_epsilon: float = field(default=math.inf, metadata={"help": "user-level DP: target epsilon per client (user) for the whole run, the server noising the clipped updates' sum (inf: off)"})
    user_delta: float = field(default=1e-5, metadata={"help": "user-level DP: target delta"})
    update_clip: float = field(default=1.0, metadata={"help": "user-level DP: L2 bound on a client's whole update (the first round's, with adaptive-clip)"})
    clip_placement: str = field(default="server", metadata={"help": "user-level DP: who clips the updates: server (trusted server) | client (each its own; the server adds the noise)"})
    adaptive_clip: bool = field(default=False, metadata={"help": "user-level DP: move update-clip towards clip-quantile of the update norms (noisy, accounted)"})
    clip_quantile: float = field(default=0.5, metadata={"help": "adaptive-clip: the share of updates the clip should leave unclipped"})
    clip_lr: float = field(default=0.2, metadata={"help": "adaptive-clip: geometric step of the clip per round"})
    clip_count_stddev: float = field(default=0.0, metadata={"help": "adaptive-clip: std of the noise on the count of unclipped updates in a cohort of the noise cohort's size (0: that size / 20)"})
    noise_cohort_size: int = field(default=0, metadata={"help": "user-level DP: size the noise for cohorts of this many clients, simulating clients-per-round of them (0: off); epsilon is then for the simulated population"})
    # model
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "embedded model, Hugging Face id or local folder"})
    pooling: str = field(default="mean", metadata={"help": "mean (masked mean of hidden states, BERT) | model (the architecture's own head)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale alpha/r)"})
    init_a: str = field(default="kaiming", metadata={"help": "A at round 0: kaiming (PEFT's) | orthonormal (its rows orthonormalized)"})
    init_a_scale: float = field(default=1.0, metadata={"help": "factor applied to A at round 0 (after init-a)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path's input"})
    lora_targets: str = field(default="query,value", metadata={"help": "comma-separated module names"})
    train_head: bool = field(default=True, metadata={"help": "train (and aggregate) the classification head"})
    head_init: str = field(default="random", metadata={"help": "head at round 0: random | zero-shot (label descriptions' embeddings; pooling=mean)"})
    head_scale: float = field(default=10.0, metadata={"help": "zero-shot head: logit scale (norm of each row)"})
    label_texts: str = field(default="", metadata={"help": "zero-shot head: comma-separated label descriptions, in label order (default: the dataset's)"})
    # data
    dataset: str = field(default=EMBEDDED_DATASET, metadata={"help": "embedded dataset, Hugging Face id or local folder"})
    text_column: str = field(default="text", metadata={"help": "text column of a Hugging Face dataset"})
    label_column: str = field(default="label", metadata={"help": "label column of a Hugging Face dataset"})
    max_length: int = field(default=48, metadata={"help": "tokens per example"})
    test_fraction: float = field(default=0.2, metadata={"help": "held-out share when the dataset has no test split"})
    partitioning: str = field(default="dirichlet", metadata={"help": "dirichlet | iid"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "label Dirichlet concentration"})
    max_train_examples: int = field(default=0, metadata={"help": "cap on training examples (0: all)"})
    max_test_examples: int = field(default=0, metadata={"help": "cap on test examples (0: all)"})
    # run
    seed: int = field(default=0, metadata={"help": "seed for partitions, init, client sampling, batches and noise (the train/test split is fixed)"})
    out: str = field(default="", metadata={"help": "run folder, new or empty (default runs/<time>-<strategy>-eps<e>-seed<s>)"})
    num_threads: int = field(default=0, metadata={"help": "torch threads per process (0: torch's default)"})
    eval_precision: str = field(default="bfloat16", metadata={"help": "server evaluation: bfloat16 (autocast, ~2x faster on CPU) | float32"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N rounds (round 0 and the last always)"})
    log: str = field(default="", metadata={"help": "also log the run to tensorboard | mlflow | tensorboard,mlflow (empty: neither; see README, 'Watching runs')"})
    mlflow_uri: str = field(default="", metadata={"help": "log=mlflow: MLflow tracking URI (empty: a SQLite store mlruns/mlflow.db beside the run folder, or in a sweep's folder)"})

    def __post_init__(self) -> None:
        self.validate()

    # -- conversion -------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a Flower run config or any mapping; unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting '{key}' (known: {', '.join(sorted(k.replace('_', '-') for k in known))})")
            kwargs[name] = _coerce(name, value, known[name].type)
        return cls(**kwargs)

    def to_dict(self, hyphenated: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k.replace("_", "-"): v for k, v in d.items()} if hyphenated else d

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def user_private(self) -> bool:
        return math.isfinite(self.user_epsilon)

    @property
    def loggers(self) -> list[str]:
        return [name.strip() for name in self.log.split(",") if name.strip()]

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    # -- checks -----------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.strategy in rules.names(),
             f"strategy must be one of {', '.join(rules.names())}, got '{self.strategy}'")
        need(self.optimizer_state != "keep" or rules.rule(self.strategy).keeps_optimizer_state,
             f"optimizer-state keep is not available with strategy {self.strategy}: what its clients train "
             "does not carry over from round to round; use reset")
        need(self.eval_precision in ("bfloat16", "float32"),
             f"eval-precision must be bfloat16 or float32, got '{self.eval_precision}'")
        need(self.train_precision in ("float32", "bfloat16"),
             f"train-precision must be float32 or bfloat16, got '{self.train_precision}'")
        need(self.optimizer_state in ("reset", "keep"),
             f"optimizer-state must be reset or keep, got '{self.optimizer_state}'")
        need(self.init_a in ("kaiming", "orthonormal"), f"init-a must be kaiming or orthonormal, got '{self.init_a}'")
        need(self.pooling in ("mean", "model"), f"pooling must be mean or model, got '{self.pooling}'")
        need(self.head_init in HEAD_INITS, f"head-init must be one of {', '.join(HEAD_INITS)}, got '{self.head_init}'")
        need(self.head_init != "zero-shot" or self.pooling == "mean",
             "head-init zero-shot needs pooling=mean (the head reads the mean-pooled embedding)")
        need(self.head_scale > 0 and math.isfinite(self.head_scale), f"head-scale must be > 0, got {self.head_scale}")
        need(self.init_a_scale > 0 and math.isfinite(self.init_a_scale),
             f"init-a-scale must be > 0, got {self.init_a_scale}")
        need(0 <= self.lora_dropout < 1, f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.partitioning in PARTITIONINGS, f"partitioning must be one of {', '.join(PARTITIONINGS)}, got '{self.partitioning}'")
        for name in ("rounds", "clients", "clients_per_round", "svd_period", "local_steps", "batch_size", "lora_r",
                     "max_length", "eval_every"):
            need(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(1 <= self.min_clients <= self.clients_per_round,
             f"min-clients must be between 1 and clients-per-round ({self.clients_per_round}), got {self.min_clients}")
        need(0 <= self.fail_rate < 1, f"fail-rate must be in [0, 1), got {self.fail_rate}")
        need(self.clients_per_round <= self.clients,
             f"clients-per-round ({self.clients_per_round}) cannot exceed clients ({self.clients})")
        need(self.epsilon > 0, f"epsilon must be > 0 (or inf for no DP), got {self.epsilon}")
        need(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        need(self.clip > 0 and math.isfinite(self.clip), f"clip must be a positive number, got {self.clip}")
        need(self.user_epsilon > 0, f"user-epsilon must be > 0 (or inf for no user-level DP), got {self.user_epsilon}")
        need(0 < self.user_delta < 1, f"user-delta must be in (0, 1), got {self.user_delta}")
        need(self.update_clip > 0 and math.isfinite(self.update_clip),
             f"update-clip must be a positive number, got {self.update_clip}")
        need(self.clip_placement in ("server", "client"),
             f"clip-placement must be server or client, got '{self.clip_placement}'")
        need(0 <= self.clip_quantile <= 1, f"clip-quantile must be in [0, 1], got {self.clip_quantile}")
        need(self.clip_lr > 0 and math.isfinite(self.clip_lr), f"clip-lr must be > 0, got {self.clip_lr}")
        need(self.clip_count_stddev >= 0 and math.isfinite(self.clip_count_stddev),
             f"clip-count-stddev must be >= 0, got {self.clip_count_stddev}")
        need(self.noise_cohort_size == 0 or self.noise_cohort_size >= self.clients_per_round,
             f"noise-cohort-size ({self.noise_cohort_size}) must be 0 (off) or at least clients-per-round "
             f"({self.clients_per_round}): it is the deployment's cohort the simulation stands for")
        need(self.lr >= 0 and math.isfinite(self.lr), f"lr must be >= 0 (0: the optimizer's default), got {self.lr}")
        need(self.head_lr >= 0 and math.isfinite(self.head_lr), f"head-lr must be >= 0, got {self.head_lr}")
        need(0 < self.test_fraction < 1, f"test-fraction must be in (0, 1), got {self.test_fraction}")
        need(self.dirichlet_alpha > 0, f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        need(self.max_train_examples >= 0 and self.max_test_examples >= 0, "max-train/test-examples must be >= 0")
        need(len(self.targets) > 0, "lora-targets names no module")
        need(self.lora_alpha > 0 and math.isfinite(self.lora_alpha), f"lora-alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        need(self.num_threads >= 0, f"num-threads must be >= 0, got {self.num_threads}")
        unknown = next((name for name in self.loggers if name not in LOGGERS), None)
        need(unknown is None, f"log takes {', '.join(LOGGERS)} or both, comma-separated, got '{unknown}'")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        need(self.orthogonalize in ("newton-schulz", "exact"),
             f"orthogonalize must be newton-schulz or exact, got '{self.orthogonalize}'")
        need(self.orthogonalize == "newton-schulz" or self.optimizer in EXACT_CAPABLE,
             f"orthogonalize exact needs optimizer {' | '.join(EXACT_CAPABLE)}, got '{self.optimizer}'")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert strings and numbers from TOML/CLI into the field's type, or fail clearly."""
    kind = annotation if isinstance(annotation, type) else {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    key = name.replace("_", "-")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if isinstance(value, str) and not math.isfinite(number) and value.strip() not in ("inf", "-inf"):
                # "1e309", "Infinity", "INF" or "nan" must not quietly become epsilon=inf (no DP)
                what = "is not a number" if math.isnan(number) else "is infinite"
                raise ConfigError(f"setting '{key}' {what} ({value!r}): only the literal inf means infinity "
                                  "(epsilon=inf: no DP)")
            return number
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"setting '{key}' expects {kind.__name__}, got {value!r}") from None
