"""Sharded training through DeepSpeed ZeRO stage 3: every parameter of the frozen bases and of the connections
partitioned across ranks, each module's gathered only while it runs.

Under ``sharding="zero3"`` the composed model is handed to ``deepspeed.initialize`` with the recipe's own AdamW
(DeepSpeed's ZeRO-3 optimiser wraps it: fp32 partitions of the connections, their gradients reduce-scattered).
The recipe keeps what it does for every other run: it normalises each micro-batch's loss by the target tokens of
the whole step, steps the learning-rate schedule itself, and writes checkpoints and the composition as full
tensors that rank 0 writes (gathered here), so a checkpoint of a ZeRO-3 run reads like a single process's.

Every rank loads the bases whole before ``deepspeed.initialize`` partitions them; building them empty on ranks but 0
is the FSDP2 path's (``train/sharding.py``). DeepSpeed is an optional dependency (``pip install deepspeed``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def empty_bases_refused(who: str) -> str:
    """The refusal of bases built empty (``who`` built them: "this rank", "rank(s) 1"): ZeRO-3 partitions what each
    rank loaded."""
    return (f"sharding='zero3' partitions the bases each rank loaded, and {who} built them empty "
            "(load_base(empty=True)): load them whole on every rank, or shard with sharding='fsdp2'")


def check_available() -> None:
    """Refuse ``sharding="zero3"`` where DeepSpeed is not installed, in one line."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ValueError("sharding='zero3' (--sharding zero3) trains through DeepSpeed, which is not installed: "
                         "pip install deepspeed (or shard with --sharding fsdp2, torch's own)") from None


def ds_config(config: Any) -> dict[str, Any]:
    """DeepSpeed's config for a ZeRO-3 run of the recipe: stage 3, float32, the recipe's clipping. Accumulation
    boundaries are set by the recipe per step (:func:`backward`), so DeepSpeed's own count is 1."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": config.max_grad_norm or 0.0,
        "steps_per_print": 2**62,  # DeepSpeed's own progress lines: the recipe logs
        "wall_clock_breakdown": False,
    }


def initialize(model: Any, optimizer: torch.optim.Optimizer, config: Any) -> tuple[Any, Any]:
    """Partition ``model`` (a ComposedModel, in place) and ``optimizer`` (over its composition parameters) with
    ZeRO-3.

    A connection's ``project`` (keys and values from the augment's states) runs outside the connection's
    ``forward``, so its parameters are registered as the composed model's: gathered for the whole forward.

    Returns:
        (the DeepSpeed engine, which runs forward, backward and step; its ZeRO-3 optimiser).
    """
    import deepspeed

    from .sharding import bases_empty

    if bases_empty(model):
        raise ValueError(empty_bases_refused("this rank"))
    # DeepSpeed's collectives call torch.distributed functions torch has deprecated; the warnings (26 lines in a
    # 6-step run on 2 ranks) are DeepSpeed's to act on, not the user's
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)
    if not torch.cuda.is_available():
        # on CPU ranks DeepSpeed would compile a shared-memory collective at the first launch (minutes); gloo's own
        # collectives do the same job. DeepSpeed reads this table (kept in its module) before building the op.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for parameter in model.composition_parameters():
        deepspeed.zero.register_external_parameter(model, parameter)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(config))
    return engine, ds_optimizer


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's share of the step's loss (already normalised: DeepSpeed does not divide it);
    ``last``: the step's last micro-batch, after which :meth:`engine.step` steps."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def grad_norm(engine: Any) -> torch.Tensor:
    """The global gradient norm of the step just taken (before clipping); infinite when DeepSpeed found it not
    finite and skipped the step."""
    norm = engine.get_global_grad_norm()
    return norm if torch.is_tensor(norm) else torch.tensor(float("inf") if norm is None else norm)


def full_composition(model: Any) -> dict[str, torch.Tensor]:
    """``model.composition_state_dict()`` as full tensors on the CPU. Every rank must call it (a gather)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(model.composition_parameters()):
        return {k: v.detach().clone().cpu() for k, v in model.composition_state_dict().items()}


def _flat_states(ds_optimizer: Any) -> list[dict[str, Any]]:
    """The wrapped AdamW's state of each flat fp32 partition (one per parameter group of DeepSpeed's)."""
    return [ds_optimizer.optimizer.state[flat] for flat in ds_optimizer.fp32_partitioned_groups_flat]


def full_optimizer_state(ds_optimizer: Any, parameters: list) -> dict[str, Any]:
    """The optimiser state as ``torch.optim.AdamW(parameters).state_dict()`` holds it on one process: every moment
    a full tensor of its parameter's shape, on the CPU. Every rank must call it (gathers)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    flats = _flat_states(ds_optimizer)
    state: dict[int, dict[str, Any]] = {}
    if flats and flats[0]:  # AdamW's state exists from its first step on
        step = flats[0]["step"]
        for i, parameter in enumerate(parameters):
            state[i] = {"step": step.detach().clone().cpu()}
            for key in ("exp_avg", "exp_avg_sq"):
                state[i][key] = safe_get_full_optimizer_state(parameter, key).reshape(parameter.ds_shape).cpu()
    (group,) = ds_optimizer.optimizer.param_groups  # the recipe's AdamW has one group
    return {"state": state, "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                                              "params": list(range(len(parameters)))}]}


def load_optimizer_state(ds_optimizer: Any, parameters: list, state: dict[str, Any]) -> None:
    """Load a full optimiser state (:func:`full_optimizer_state`'s, or one process's AdamW) into DeepSpeed's ZeRO-3
    optimiser: each rank keeps its partition of every moment. Every rank must call it."""
    from deepspeed.utils import safe_set_full_optimizer_state

    moments = state["state"]
    if not moments:
        return
    step = next(iter(moments.values()))["step"]
    for flat, flat_state in zip(ds_optimizer.fp32_partitioned_groups_flat, _flat_states(ds_optimizer)):
        flat_state.update(step=step.clone(), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    for i, parameter in enumerate(parameters):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(parameter, moments[i][key].to(parameter.ds_tensor.device), key)
    (group,) = ds_optimizer.optimizer.param_groups
    group.update({k: v for k, v in state["param_groups"][0].items() if k != "params"})

