"""Safe edit files (editing.edit_file): a malicious pickle handed to `load_edit` is refused and never
runs; damaged, empty, truncated and altered files name the file and the fault; every editor's edit
round-trips exactly through the file."""
import pickle

import pytest
import torch

from editing.edit_file import EditFileError, read_edit_file
from editing.editors import COMEBA, FT, MEMIT, IReVa
from tests.test_locate import REQS, with_stats

FAST = dict(template_spec=[[3, 2]], v_steps=4, mom2_update_weight=1.0)


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))   # unpickling would create the marker file


def test_a_malicious_pickle_is_refused_and_never_runs(tiny_llama, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "edit.ckpt"
    for payload in (pickle.dumps({"state_dict": Planted(marker)}), None):
        if payload is None:
            torch.save({"state_dict": Planted(marker)}, bad)     # torch's zip pickle too
        else:
            bad.write_bytes(payload)
        with pytest.raises(EditFileError, match="edit.ckpt.*not an edit file"):
            FT(base_model=tiny_llama, layers=[1]).load_edit(bad)
        assert not marker.exists()


def test_damaged_files_name_the_file_and_the_fault(tiny_llama, tmp_path):
    ed = FT(base_model=tiny_llama, layers=[1], steps=3)
    ed.edit(REQS[:1])
    good = ed.save_edit(tmp_path / "good.edit")
    data = good.read_bytes()
    empty = tmp_path / "empty.edit"
    empty.write_bytes(b"")
    with pytest.raises(EditFileError, match="empty.edit: the file is empty"):
        read_edit_file(empty)
    cut = tmp_path / "cut.edit"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EditFileError, match="cut.edit: not an edit file"):
        read_edit_file(cut)
    altered = tmp_path / "altered.edit"
    altered.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))
    with pytest.raises(EditFileError, match="altered.edit: .*checksum"):
        read_edit_file(altered)
    with pytest.raises(EditFileError, match="no such edit file"):
        read_edit_file(tmp_path / "missing.edit")


@pytest.mark.parametrize("make", [
    lambda p: FT(base_model=p, layers=[1], steps=3),
    lambda p: IReVa(base_model=p, layers=[1], retrofit=False),
    lambda p: with_stats(MEMIT(base_model=p, layers=[0, 1], fusion="dr", **FAST)),
    lambda p: with_stats(COMEBA(base_model=p, layers=[0, 1], alpha_z=0.1, **FAST)),
])
def test_every_edit_round_trips_exactly(tiny_llama, tmp_path, make):
    ed = make(tiny_llama)
    ed.edit(REQS[:2])
    ed.edit(REQS[2:])
    path = ed.save_edit(tmp_path / "e.edit")
    fresh = make(tiny_llama)
    if isinstance(fresh, (MEMIT, COMEBA)):
        fresh._stats = ed._stats
    fresh.load_edit(path)
    a, b = ed.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
    x = ed.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ed.model(**x).logits, fresh.model(**x).logits)
    assert fresh.edit_log == ed.edit_log


def test_structures_pack_and_unpack():
    tensors = {}
    obj = {"a": (torch.ones(2), [1, 2.5, None, "x"]), "b": {3: torch.zeros(1)}}
    from editing.edit_file import pack, unpack
    back = unpack(pack(obj, tensors), tensors)
    assert isinstance(back["a"], tuple) and torch.equal(back["a"][0], torch.ones(2)) and back["a"][1] == [1, 2.5, None, "x"]
    assert list(back["b"]) == [3] and torch.equal(back["b"][3], torch.zeros(1))
