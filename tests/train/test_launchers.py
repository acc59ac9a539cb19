"""Which backend a launch gets: never N lone single-process jobs under an MPI launcher."""

from __future__ import annotations

import importlib.util

import pytest

from uniter3m.errors import UserError
from uniter3m.train.distributed import detect_launcher, init_backend


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "horovod"),  # horovodrun --gloo
        ({"RANK": "1", "WORLD_SIZE": "2"}, "torch"),  # torchrun
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),  # Open MPI mpirun / horovodrun
        ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "mpi"),  # MPICH, Intel MPI
        ({"PMIX_RANK": "0", "PMIX_SIZE": "2"}, "mpi"),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, "single"),  # mpirun -np 1 is one process
        ({}, "single"),
    ],
)
def test_detect_launcher(env, want):
    assert detect_launcher(env) == want


def test_an_mpi_launch_without_mpi_horovod_is_refused(monkeypatch):
    for name in ("HOROVOD_RANK", "HOROVOD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    if importlib.util.find_spec("horovod") is not None:
        import horovod.torch as hvd

        if hvd.mpi_built():
            pytest.skip("this Horovod has MPI: an mpirun launch is a real Horovod run")
    with pytest.raises(UserError, match=r"MPI launcher \(2 processes\)"):
        init_backend("cpu")
