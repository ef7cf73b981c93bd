"""The speed probe: a few real training steps, timed, so a plan can fit a run into its time budget, and the
choice of CPU threads, measured rather than assumed."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from models.network import TransferNet
from models.preprocessing import Preprocessing
from training.cache import Augment, CachedImages, autocast, predict_cached
from training.config import TrainConfig

PROBE_STEPS = 3
"""Timed steps of the speed probe (after one warm-up step); the fastest counts: on a shared CPU the others
measure the neighbours."""


def seconds_per_step(config: TrainConfig, model: TransferNet, train: CachedImages, preprocessing: Preprocessing,
                     side: int, device: torch.device, criterion: nn.Module) -> float:
    """Measured seconds of one training step (augmentation, forward, backward) at `side`, on a copy of the model."""
    probe = copy.deepcopy(model)
    probe.train()
    augment = Augment(config, preprocessing, side)
    rng_state = torch.get_rng_state()
    times = []
    for i in range(PROBE_STEPS + 1):
        started = time.perf_counter()
        index = torch.arange(i * config.batch_size, (i + 1) * config.batch_size) % len(train)
        images = augment(train.images[index]).to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits, _ = probe(images)
            loss = criterion(logits.float(), train.targets[index].to(device))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    torch.set_rng_state(rng_state)
    del probe
    return float(min(times[1:]))


def eval_seconds_per_image(model: TransferNet, val: CachedImages, preprocessing: Preprocessing,
                           device: torch.device) -> float:
    """Measured seconds of one image's forward pass at the serving size (0 without validation images)."""
    if len(val) == 0:
        return 0.0
    sample = val.head(16)
    started = time.perf_counter()
    predict_cached(model, sample, preprocessing, device)
    return (time.perf_counter() - started) / len(sample)


def choose_threads(config: TrainConfig, model: TransferNet, train: CachedImages, preprocessing: Preprocessing,
                   side: int, device: torch.device, criterion: nn.Module, show_progress: bool) -> int:
    """`config.threads`, or the faster of 1 and all intra-op threads, measured: on a shared CPU, threads that wait
    on each other can cost several times their gain (10x measured at load 10 on 2 cores)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
        return config.threads
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    many = seconds_per_step(config, model, train, preprocessing, side, device, criterion)
    torch.set_num_threads(1)
    single = seconds_per_step(config, model, train, preprocessing, side, device, criterion)
    chosen = 1 if single < many else threads
    torch.set_num_threads(chosen)
    if show_progress:
        tqdm.write(f"speed probe: {many:.2f} s/step with {threads} threads, {single:.2f} with 1: training with {chosen}")
    return chosen
