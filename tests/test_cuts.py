"""Per-client cut points: config, the server's models, upload validation, resume."""

from __future__ import annotations

import pytest
import torch

from collafuse import config
from collafuse.client import Upload
from collafuse.engines.local import run
from collafuse.errors import ConfigError
from collafuse.experiment import build
from collafuse.server_model import SharedModel
from support import REPRODUCIBLE, TINY

CUTS = ["split.client_cuts=[10,40,100]"]


def test_config_checks_the_cuts() -> None:
    with pytest.raises(ConfigError, match="split.client_cuts"):
        config.load(None, [*TINY, "split.client_cuts=[10,400,20]"])
    with pytest.raises(ConfigError, match="one t_zeta per client"):
        build(config.load(None, [*TINY, "split.client_cuts=[10,20]"]))
    with pytest.raises(ConfigError, match="train.aggregation"):
        config.load(None, [*TINY, *CUTS, "train.aggregation=\"fedavg\""])
    with pytest.raises(ConfigError, match="split.server_model"):
        config.load(None, [*TINY, "split.server_model=\"one\""])


def test_each_client_uploads_at_its_own_cut_and_the_server_checks_it() -> None:
    exp = build(config.load(None, [*TINY, *CUTS, "split.server_model=\"per_cut\""]))
    assert [c.split.t_zeta for c in exp.clients] == [10, 40, 100]
    assert sorted(exp.server.model.by_cut) == [10, 40]
    ups = [c.make_upload(0) for c in exp.clients]
    assert ups[2] is None  # t_zeta = T: the client is alone
    assert [u.t_zeta for u in ups[:2]] == [10, 40]
    assert len(exp.server.accept(ups[:2])) == 2
    wrong = Upload(0, 0, 40, ups[1].x_t_zeta, ups[0].labels)  # client 0 claims client 1's cut
    assert exp.server.accept([wrong]) == [] and "client's cut is 10" in exp.server.rejected[-1][2]
    alone = Upload(2, 0, 100, ups[1].x_t_zeta, ups[0].labels)  # client 2 (t_zeta = T) sends nothing
    assert exp.server.accept([alone]) == [] and "alone" in exp.server.rejected[-1][2]
    before = {k: [p.clone() for p in t.model.parameters()] for k, t in exp.server.model.by_cut.items()}
    exp.server.train_round(ups[:1])  # only the cut-10 model learns from client 0's upload
    changed = {k: any(not torch.equal(a, b) for a, b in zip(before[k], t.model.parameters(), strict=True))
               for k, t in exp.server.model.by_cut.items()}
    assert changed == {10: True, 40: False}


def test_shared_model_trains_every_upload_on_its_own_tail() -> None:
    exp = build(config.load(None, [*TINY, *CUTS]))  # shared is the default
    assert isinstance(exp.server.model, SharedModel) and list(exp.server.model.trainers()) == ["server"]
    trainer = exp.server.trainer
    seen = []
    forward = trainer.model.forward

    def spy(x, t, y=None):
        seen.append(t.clone())
        return forward(x, t, y)

    trainer.model.forward = spy
    cuts = torch.tensor([10] * 1000 + [40] * 1000)
    loss = trainer.step_shared(exp.split.schedule, torch.zeros(2000, 1, 8, 8), cuts, None)
    t = seen[0]
    assert loss == loss  # finite, not NaN
    assert int(t[:1000].min()) == 11 and int(t[1000:].min()) == 41 and int(t.max()) == 100
    assert float(t[1000:].float().mean()) == pytest.approx(70.5, abs=2.5)  # uniform over 41..100 (sd 0.55)


def test_a_run_with_per_client_cuts_resumes_exactly(tmp_path) -> None:
    """Resumed against straight, bit for bit: in the reproducible upload-noise mode (two runs)."""
    cfg = config.load(None, [*TINY, *CUTS, REPRODUCIBLE])
    full = run(cfg, tmp_path / "full", progress=False)
    half = config.load(None, [*TINY, *CUTS, REPRODUCIBLE, "train.rounds=2"])
    run(half, tmp_path / "resumed", progress=False)
    resumed = run(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert [h["server_loss"] for h in resumed["history"]] == [h["server_loss"] for h in full["history"]]
    assert full["client_cuts"] == {"0": 10, "1": 40, "2": 100}
    with pytest.raises(Exception, match="client cuts|differs"):
        run(config.load(None, [*TINY, "split.client_cuts=[10,30,100]"]), tmp_path / "resumed", resume=True,
            progress=False)
