"""Serving a tensor/layer-parallel engine: rank 0 runs the server (ftlab.serve), every other rank follows it.

The server calls generate() or stream() on rank 0 only. A ParallelLeader stands in for the model there: before it
runs a call on its share of the model it sends the call (its kind, prompts and keyword arguments) to the other
ranks, which run the same call on theirs (`follow`). The calls go over a gloo group of their own whose timeout is
far beyond any idle spell, because a follower waits for the next request as long as the server has none; the
collectives inside a call keep the engine's timeout.

A call whose inputs are wrong fails alike on every rank before its first collective (generate() validates first),
so the followers just wait for the next call and the server answers that request with the error, as it does in one
process. The followers' results are dropped: every rank ends a call with the same tokens (ftlab.parallel
broadcasts them), and rank 0 answers. An error on some ranks only (out of memory) cannot fail alone: the ranks'
collectives fall out of step, a follower exits with the error (at once, or at the engine's collective timeout), and
torchrun ends the job rather than leaving it hanging."""
from __future__ import annotations

import datetime
import sys
from typing import Iterator

import torch.distributed as dist

from .generate import GenerationOutput, StepOutput, generate, stream

IDLE_TIMEOUT = datetime.timedelta(days=365)  # how long a follower waits for the next call


def calls_group():
    """The group that carries the calls from rank 0; every rank must create it, after the engine's own groups."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class ParallelLeader:
    """Rank 0's stand-in for the model: what InferenceServer needs of one (config, dtype, run_generate,
    run_stream), each call run on every rank."""

    def __init__(self, engine, group):
        if engine.layout.rank != 0:
            raise ValueError(f"the leader runs on rank 0, not on rank {engine.layout.rank}")
        self.engine, self.group = engine, group
        self.config, self.dtype = engine.config, engine.model.dtype
        self.pipeline_para_size = engine.layout.pp  # FT's name for layer_para_size, in the served model's config

    def _announce(self, kind: str, prompts=None, kwargs=None) -> None:
        dist.broadcast_object_list([(kind, prompts, kwargs)], src=0, group=self.group)

    def run_generate(self, prompts, **kwargs) -> GenerationOutput:
        self._announce("generate", prompts, kwargs)
        return generate(self.engine, prompts, **kwargs)

    def run_stream(self, prompts, **kwargs) -> Iterator[StepOutput]:
        """Every step, as stream() yields them; the caller must take them all (the followers run to the end)."""
        self._announce("stream", prompts, kwargs)
        yield from stream(self.engine, prompts, **kwargs)

    def close(self) -> None:
        """Release the followers (their `follow` returns), then close the engine."""
        self._announce("stop")
        self.engine.close()


def follow(engine, group) -> None:
    """Every rank but 0: run each call rank 0's ParallelLeader sends, until it stops; then close the engine."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=group)
        kind, prompts, kwargs = message[0]
        if kind == "stop":
            break
        try:
            if kind == "generate":
                generate(engine, prompts, **kwargs)
            else:
                for _ in stream(engine, prompts, **kwargs):
                    pass
        except ValueError as exc:  # GenerationError and the like: the leader met the same one and answers it
            print(f"ftlab serve (rank {engine.layout.rank}): request refused: {exc}", file=sys.stderr, flush=True)
    engine.close()
