"""Fine-tuning a backbone with its own library's trainer, then a head refit: a retraining step for active learning.

:func:`fine_tune` dispatches on the backbone kind:

- ``mace``: mace-torch's own fine-tuning, ``mace_run_train --foundation_model FILE`` (in a subprocess,
  :func:`~probe_ase.al.retrain.run_mace_train`) with the current model saved to FILE, its atomic reference
  energies kept (``--E0s=foundation``) and single-head fine-tuning (``--multiheads_finetuning=False``: the
  replay of a foundation model's pretraining data needs that data, which a local model does not come with);
- ``chgnet``: ``chgnet.trainer.Trainer`` on a copy of the current CHGNet (:func:`fine_tune_chgnet`);
- ``sevenn``: ``sevenn.train.trainer.Trainer`` on a copy of the current SevenNet, saved as a SevenNet checkpoint
  (:func:`fine_tune_sevenn`).

Any other backbone (SchNet, PaiNN) raises a :class:`~probe_ase.exceptions.BackboneError`: retrain
it with its own tools and pass a trainer callable of your own. :class:`FineTuner` is the trainer callable for
:meth:`ActiveLearner.run_round <probe_ase.al.learner.ActiveLearner.run_round>`: it holds out a share of the
labelled frames, fine-tunes on the rest, and refits the head on the new backbone
(:func:`~probe_ase.al.retrain.refit_head`): the old head's fingerprint no longer matches, so it is never reused.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from probe_ase.al.retrain import hold_out, mace_training_frames, refit_head, run_mace_train
from probe_ase.backbones import load_backbone
from probe_ase.calculator import ProbeCalculator
from probe_ase.exceptions import BackboneError, InputError
from probe_ase.fitting.data import Frames, read_frames
from probe_ase.taps.base import Tap

#: backbone kinds :func:`fine_tune` has a route for
FINE_TUNABLE = ("mace", "chgnet", "sevenn")


def fine_tune(tap: Tap, frames: Sequence[Atoms], work_dir: str | os.PathLike, name: str, *, epochs: int = 5,
              learning_rate: float | None = None, seed: int = 0, extra_args: Sequence[str] = ()) -> Path:
    """Fine-tune the backbone ``tap`` watches on ``frames`` (energies eV, forces eV/Å) with its own library's
    trainer; return the new model file (in ``work_dir``), which :func:`~probe_ase.backbones.load_backbone` reads.

    The backbone itself is left as it was. ``learning_rate`` is the trainer's initial one (None: the library's
    default for MACE, 0.01, 1e-3 for CHGNet and 1e-4 for SevenNet); ``extra_args`` are
    further ``mace_run_train`` flags (MACE only). A backbone without a route here (:data:`FINE_TUNABLE`) is a
    :class:`BackboneError`.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if tap.kind == "mace":
        foundation = work / f"{name}_start.model"
        tap.save_backbone(foundation)
        batch = min(8, max(1, len(frames) // 4))  # mace-torch drops a last partial batch: a few frames need small ones
        flags = ["--E0s=foundation", "--multiheads_finetuning=False", f"--batch_size={batch}",
                 f"--valid_batch_size={batch}", *([f"--lr={learning_rate}"] if learning_rate else []), *extra_args]
        return run_mace_train(frames, foundation, work, name, epochs, seed, flags)
    if tap.kind not in FINE_TUNABLE:
        raise BackboneError(f"no fine-tuning route for a {tap.kind} backbone (routes: {', '.join(FINE_TUNABLE)}); "
                            "retrain it with its own library and pass your own trainer callable",
                            kind=tap.kind, routes=FINE_TUNABLE)
    if extra_args:
        raise InputError(f"extra_args are mace_run_train flags; {tap.kind} takes none", extra_args=list(extra_args))
    device = next(tap.module.parameters()).device.type  # train where the model lives
    if tap.kind == "chgnet":
        return fine_tune_chgnet(tap.module, frames, work / f"{name}.chgnet", epochs=epochs,
                                learning_rate=learning_rate or 1e-3, seed=seed, device=device)
    return fine_tune_sevenn(tap.calc, frames, work / f"{name}.pth", epochs=epochs,
                            learning_rate=learning_rate or 1e-4, seed=seed, device=device)


def fine_tune_chgnet(model: torch.nn.Module, frames: Sequence[Atoms], path: str | os.PathLike, *, epochs: int = 5,
                     learning_rate: float = 1e-3, batch_size: int = 4, freeze: bool = True, seed: int = 0,
                     device: str = "cpu") -> Path:
    """Fine-tune a copy of the CHGNet ``model`` on periodic ``frames`` (energies eV, forces eV/Å) with
    ``chgnet.trainer.Trainer``; save it to ``path`` in CHGNet's file format (``{"model": CHGNet.as_dict()}``,
    which :func:`~probe_ase.backbones.load_backbone` reads) and return ``path``.

    First the per-element reference energies (CHGNet's ``AtomRef``) are shifted by a least-squares fit to the
    frames' energy offsets (eV/atom), so a reference code with other zero energies does not pull on the
    network. Then ``epochs`` epochs of Adam at ``learning_rate`` on the energy per atom (CHGNet's target) and
    forces, with the embeddings and all but the last atom convolution frozen when ``freeze`` (CHGNet's own
    fine-tuning recipe), on ``device``. CHGNet's trainer validates after each epoch: here on the training
    frames, for its log (``path`` + ``.log``) only. ``seed`` seeds the batches and torch's global generator.
    """
    from chgnet.data.dataset import StructureData, collate_graphs
    from chgnet.trainer import Trainer

    net = _clean_copy(model).to(device)
    structures, energies, forces = _chgnet_data(frames)
    _align_references(net, structures, energies)
    if freeze:
        frozen = [net.atom_embedding, net.bond_embedding, net.angle_embedding, net.bond_basis_expansion,
                  net.angle_basis_expansion, *net.atom_conv_layers[:-1], *net.bond_conv_layers, *net.angle_layers]
        for param in (p for layer in frozen if layer is not None for p in layer.parameters()):
            param.requires_grad = False
    log = Path(f"{os.fspath(path)}.log")
    with open(log, "w") as out, contextlib.redirect_stdout(out):
        data = StructureData(structures, energies, forces, graph_converter=net.graph_converter, shuffle=False)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate_graphs,
                                             generator=torch.Generator().manual_seed(seed))
        trainer = Trainer(model=net, targets="ef", optimizer="Adam", scheduler="CosLR", criterion="MSE",
                          epochs=epochs, learning_rate=learning_rate, use_device=device, torch_seed=seed,
                          print_freq=max(1, len(loader)))
        trainer.train(loader, loader, save_dir="")  # "": no per-epoch checkpoint files
    saved = net.as_dict()
    # the output MLPs' biases are read from the weights' names by CHGNetTap.load, which passes mlp_out_bias
    # itself: a copy in model_args (as live models carry it) would reach CHGNet twice
    saved["model_args"] = {k: v for k, v in saved["model_args"].items() if k != "mlp_out_bias"}
    torch.save({"model": saved}, path)
    return Path(path)


def _clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of ``model`` without probe-ase's hooks (the original stays as it is)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for param in clone.parameters():
        param.requires_grad = True
    return clone


def _chgnet_data(frames: Sequence[Atoms]) -> tuple[list, list[float], list[np.ndarray]]:
    """pymatgen structures, energies per atom (eV/atom) and forces (eV/Å) of periodic ``frames``."""
    from pymatgen.io.ase import AseAtomsAdaptor

    structures, energies, forces = [], [], []
    for index, atoms in enumerate(mace_training_frames(frames)):
        if not atoms.pbc.all():
            raise BackboneError("CHGNet trains on periodic cells only: put the structure in a box with pbc=True",
                                index=index, pbc=tuple(atoms.pbc))
        structures.append(AseAtomsAdaptor.get_structure(atoms))
        energies.append(atoms.info["REF_energy"] / len(atoms))
        forces.append(atoms.arrays["REF_forces"])
    return structures, energies, forces


def _align_references(net: torch.nn.Module, structures: list, energies: list[float]) -> None:
    """Shift ``net``'s per-element reference energies by the least-squares fit of the energy offsets (eV/atom)
    between ``energies`` and its predictions on ``structures``, over the elements they hold."""
    net.eval()
    with torch.no_grad():
        device = next(net.parameters()).device
        graphs = [net.graph_converter(s).to(device) for s in structures]
        predicted = net(graphs, task="e")["e"].double().cpu().numpy()
    zs = sorted({site.specie.Z for s in structures for site in s})
    fractions = np.array([[sum(site.specie.Z == z for site in s) / len(s) for z in zs] for s in structures])
    shift = np.linalg.lstsq(fractions, np.asarray(energies) - predicted, rcond=None)[0]
    with torch.no_grad():
        weight = net.composition_model.fc.weight
        weight[0, [z - 1 for z in zs]] += torch.as_tensor(shift, dtype=weight.dtype, device=weight.device)


def fine_tune_sevenn(calc: object, frames: Sequence[Atoms], path: str | os.PathLike, *, epochs: int = 5,
                     learning_rate: float = 1e-4, batch_size: int = 2, force_weight: float = 1.0, seed: int = 0,
                     device: str = "cpu") -> Path:
    """Fine-tune a copy of the model of the single-fidelity ``SevenNetCalculator`` ``calc`` on ``frames``
    (energies eV, forces eV/Å) with ``sevenn.train.trainer.Trainer``; save it to ``path`` as a SevenNet
    checkpoint (what sevenn's own training writes, which :func:`~probe_ase.backbones.load_backbone` reads) and
    return ``path``.

    First the per-element energy shifts (``rescale_atomic_energy.shift``, eV/atom) are moved by a least-squares
    fit to the frames' energy offsets, so a reference code with other zero energies does not pull on the
    network. Then ``epochs`` epochs of Adam at ``learning_rate``, decayed over them by a cosine, on the model's
    own loss (7net-0: Huber) of the energy per atom (weight 1) and forces (``force_weight``), no stress, shift and
    scale frozen (sevenn's default), on ``device``; each epoch's training errors go to ``path`` + ``.log``.
    ``seed`` seeds the batches. A model without its checkpoint's config, or a multi-fidelity one, is refused.
    """
    from sevenn import __version__
    from sevenn.error_recorder import ErrorRecorder
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.train.trainer import Trainer
    from torch_geometric.loader import DataLoader

    if not isinstance(getattr(calc, "sevennet_config", None), dict):
        raise BackboneError("this SevenNetCalculator carries no checkpoint config to train from: load the model "
                            "from its checkpoint (load_backbone)", model=type(calc.model).__name__)
    if getattr(calc, "modal", None):
        raise BackboneError("fine-tuning a multi-fidelity SevenNet is not supported: start from a single-fidelity "
                            "model (7net-0, 7net-l3i5)", modal=calc.modal)
    config = copy.deepcopy(calc.sevennet_config)
    config.update(is_train_stress=False, force_loss_weight=float(force_weight), optimizer="adam",
                  optim_param={"lr": learning_rate}, scheduler="cosineannealinglr", scheduler_param={"T_max": epochs},
                  epoch=int(epochs), device=device, is_ddp=False, version=__version__)  # the state dict is this sevenn's
    net = build_E3_equivariant_model(config)  # as sevenn builds a checkpoint's model, then the current weights
    net.load_state_dict(calc.model.state_dict())
    net.to(device)
    graphs = _sevenn_graphs(frames, float(calc.cutoff))
    _align_shifts(net, graphs, calc.type_map, device)
    config["shift"] = net.rescale_atomic_energy.shift.detach().cpu().tolist()
    torch.manual_seed(seed)
    loader = DataLoader(graphs, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = Trainer.from_config(net, config)
    recorder = ErrorRecorder.from_config(config, trainer.loss_functions)
    with open(f"{os.fspath(path)}.log", "w") as log:
        for epoch in range(1, epochs + 1):
            lr = trainer.get_lr()
            trainer.run_one_epoch(loader, is_train=True, error_recorder=recorder)
            errors = ", ".join(f"{k} {v:.5f}" for k, v in recorder.epoch_forward().items())
            print(f"epoch {epoch}/{epochs} lr {lr:.2e}: {errors}", file=log)
            trainer.scheduler_step()
    trainer.write_checkpoint(os.fspath(path), config=config, epoch=epochs)
    return Path(path)


def _sevenn_graphs(frames: Sequence[Atoms], cutoff: float) -> list:
    """sevenn's labelled graphs (``AtomGraphData``: energy eV, forces eV/Å) of ``frames`` at ``cutoff`` (Å)."""
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import atoms_to_graph

    graphs = []
    for atoms in mace_training_frames(frames):
        atoms.info = {"y_energy": atoms.info["REF_energy"]}
        atoms.arrays["y_force"] = atoms.arrays.pop("REF_forces")
        graphs.append(AtomGraphData.from_numpy_dict(atoms_to_graph(atoms, cutoff, transfer_info=False)))
    return graphs


def _align_shifts(net: torch.nn.Module, graphs: list, type_map: dict, device: str) -> None:
    """Move ``net``'s per-element energy shifts by the least-squares fit of the energy offsets (eV/atom) between
    the labels of ``graphs`` and its predictions, over the elements they hold (``type_map``: Z to shift index)."""
    from torch_geometric.data import Batch

    net.set_is_batch_data(True)
    batch = Batch.from_data_list([g.clone() for g in graphs]).to(device)
    predicted = net(batch)["inferred_total_energy"].detach().double().cpu().numpy().reshape(-1)
    numbers = [g["atomic_numbers"].cpu().numpy() for g in graphs]
    zs = sorted({int(z) for n in numbers for z in n})
    fractions = np.array([[np.mean(n == z) for z in zs] for n in numbers])
    offsets = np.array([(float(g["total_energy"]) - e) / len(n) for g, e, n in zip(graphs, predicted, numbers)])
    shift = np.linalg.lstsq(fractions, offsets, rcond=None)[0]
    with torch.no_grad():
        weights = net.rescale_atomic_energy.shift
        weights[[type_map[z] for z in zs]] += torch.as_tensor(shift, dtype=weights.dtype, device=weights.device)


class FineTuner:
    """A retraining step for :meth:`ActiveLearner.run_round <probe_ase.al.learner.ActiveLearner.run_round>`:
    fine-tune the current backbone with its library's trainer (:func:`fine_tune`), then refit the head.

    Each call holds out ``holdout`` of the labelled frames (at least one; :attr:`held_out`, for the error
    before and after), fine-tunes on ``train_data`` plus the rest, and refits the head on ``fit_data`` plus
    the held-out frames with the old head's settings (:func:`~probe_ase.al.retrain.refit_head`). The new model
    (:attr:`model`: ``round{N}_model/round{N}.model`` for MACE, ``round{N}.chgnet`` for CHGNet, ``round{N}.pth``
    for SevenNet) and head
    (``round{N}_probe.pt``) go to ``work_dir``.

    Args:
        fit_data: labelled frames the head is refitted on (energies eV, forces eV/Å; never training frames).
        train_data: frames the backbone trains on besides the new ones (eV, eV/Å; a pretrained CHGNet or SevenNet:
            none).
        work_dir: folder for training files, logs and models.
        epochs: fine-tuning epochs per round.
        learning_rate: the trainer's initial learning rate (None: :func:`fine_tune`'s default).
        head_epochs: most epochs for the head refit.
        holdout: share (0-1) of each round's labelled frames kept out of training.
        extra_args: further ``mace_run_train`` flags (MACE only).
    """

    def __init__(self, fit_data: Frames, train_data: Frames | None = None, work_dir: str | os.PathLike = "al-finetune",
                 epochs: int = 5, learning_rate: float | None = None, head_epochs: int = 100, holdout: float = 0.3,
                 seed: int = 0, extra_args: Sequence[str] = ()) -> None:
        if not 0 < holdout < 1:
            raise InputError(f"holdout must lie strictly between 0 and 1, got {holdout}", holdout=holdout)
        self.fit_frames = read_frames(fit_data)
        self.train_frames = read_frames(train_data) if train_data is not None else []
        self.work_dir, self.epochs, self.learning_rate = Path(work_dir), int(epochs), learning_rate
        self.head_epochs, self.holdout, self.seed = int(head_epochs), float(holdout), int(seed)
        self.extra_args = list(extra_args)
        self.held_out: list[Atoms] = []
        self.model: Path | None = None  # the last round's fine-tuned model file

    def __call__(self, labelled: list[Atoms], round: int, current: ProbeCalculator) -> ProbeCalculator:
        """One round: fine-tune ``current``'s backbone on the labelled frames (eV, eV/Å) not held out, refit
        the head on the new backbone, return a calculator on both."""
        self.held_out, train = hold_out(labelled, self.holdout, self.seed + round)
        self.model = fine_tune(current.tap, self.train_frames + train, self.work_dir, f"round{round}",
                               epochs=self.epochs, learning_rate=self.learning_rate, seed=self.seed,
                               extra_args=self.extra_args)
        base = load_backbone(self.model, current.tap.kind)
        return refit_head(base, current.probe.meta, self.fit_frames + self.held_out, self.head_epochs, self.seed,
                          self.work_dir / f"round{round}_probe.pt")
