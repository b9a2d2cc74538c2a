"""The sweep composer against Hydra's own load_sweep_config, job by job."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from gradsweep.config.store import register
from gradsweep.hydra_shim import basic_sweeper, parse_overrides
from gradsweep.sweep.compose import SweepComposer, settle_data_dims
from gradsweep.sweep.preflight import CONF_DIR


@pytest.fixture
def loader():
    register()  # as python -m gradsweep does before Hydra composes
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().hydra.config_loader
    GlobalHydra.instance().clear()


def _jobs(sweep: list[str]) -> list[list[str]]:
    parsed = parse_overrides(sweep)
    return [job for batch in basic_sweeper().split_arguments(parsed, None) for job in batch]


SWEEPS = {
    "groups and values": ["model.depth=2,10", "init=xavier,kaiming,large", "optim.lr=0.01,0.1"],
    "optimiser preset and its fields": ["optim=sgd,adam", "optim.weight_decay=0,0.01", "train.clip_norm=null,1.0"],
    "additions and deletions": ["+tag=a,b", "++quiet=true", "~verdict.explode_above", "data=regression,scaled"],
    "interpolations": ["+ref=${model.depth}", "model.width=4,8", "+note='depth ${model.depth}'"],
    "quoting and types": ["+name='x,y'", "model.residual=true,false", "train.seed=range(0,3)", "+f=1e-3"],
    "an article preset and its sweep": ["+experiment=clipping", "train.clip_norm=null,10", "train.seed=range(0,2)"],
    "values Hydra composes itself": ["+d={a:1}", "hydra.job.chdir=false", "model.depth=3"],
    "a user's module and its arguments": ["model=custom", "model.net._target_=torch.nn.Linear", "model.net.bias=true,false",
                                          "model.net.in_features=1,2", "+model.net.out_features=1"],
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_every_job_equals_hydras(loader, name):
    sweep = SWEEPS[name]
    master = loader.load_configuration("config", sweep, run_mode=RunMode.MULTIRUN)
    composer = SweepComposer(loader, master)
    jobs = _jobs(sweep)
    assert jobs
    for idx, job in enumerate(jobs):
        got = composer.compose(job, idx)
        want = loader.load_sweep_config(master, job)
        with open_dict(want):  # what Hydra's launchers set before a job runs
            want.hydra.job.id = idx
            want.hydra.job.num = idx
        want_unresolved = OmegaConf.to_container(want, resolve=False)
        hydra_node = want_unresolved.pop("hydra")
        if not got.fast:  # what the launcher adds before resolving: ${data.in_dim} reads the data's size
            settle_data_dims(want)
        want_resolved = {k: OmegaConf.to_container(want[k], resolve=True) if OmegaConf.is_config(want[k]) else want[k]
                         for k in want.keys() if k != "hydra"}
        assert got.unresolved == want_unresolved, job
        assert got.task == want_resolved, job
        assert got.overrides == list(hydra_node["overrides"]["task"])
        assert got.override_dirname == hydra_node["job"]["override_dirname"]
    if name in ("groups and values", "optimiser preset and its fields", "additions and deletions", "quoting and types",
                "an article preset and its sweep", "a user's module and its arguments"):
        assert composer.n_hydra == 0  # all from templates (model.net takes new keys, as Hydra lets it)
    else:
        assert composer.n_hydra > 0  # interpolations, dict values, hydra.* overrides: Hydra composed those jobs


def test_templates_are_one_per_group_combination(loader):
    sweep = ["model.depth=2,10", "init=xavier,kaiming", "optim.lr=0.01,0.1,1.0"]
    master = loader.load_configuration("config", sweep, run_mode=RunMode.MULTIRUN)
    composer = SweepComposer(loader, master)
    for job in _jobs(sweep):
        composer.compose(job)
    assert len(composer._templates) == 2 and composer.n_fast == 12


def test_what_hydra_rejects_is_left_to_hydra(loader):
    master = loader.load_configuration("config", [], run_mode=RunMode.MULTIRUN)
    composer = SweepComposer(loader, master)
    for job in (["model.nope=1"], ["+model.depth=3"], ["~model.nope"]):
        with pytest.raises(Exception) as e:
            composer.compose(job)
        assert "model" in str(e.value)
    assert composer.n_fast == 0
