"""`SnapshotUndo`: exact `undo(steps)` for editors whose `snapshot()` captures their whole edit state
(LoRA's adaptor tensors; MELO's blocks, database and labels). The snapshot taken before each step is
kept in memory for the session (not in the edit file): undo restores it, so the edit state is
bit-for-bit what it was before those steps. Memory grows by one snapshot per step (LoRA on SmolLM2:
about 2 MB; MELO: its database)."""
from __future__ import annotations


class SnapshotUndo:
    def edit(self, step):
        snap, n = self.snapshot(), len(self.edit_log)
        info = super().edit(step)
        if len(self.edit_log) > n:
            self.__dict__.setdefault("_undo_snapshots", []).append(snap)
        return info

    def undo(self, steps: int = 1) -> None:
        """Withdraw the last `steps` edit steps of this session exactly."""
        history = self.__dict__.setdefault("_undo_snapshots", [])
        if steps < 1:
            raise ValueError(f"undo takes a number of steps >= 1, got {steps}")
        if steps > len(history):
            raise ValueError(f"only {len(history)} step(s) of this session to undo (edits loaded from a file "
                             "cannot be undone step by step)")
        self.restore(history[-steps])
        del history[-steps:]
        del self.edit_log[-steps:]

    def load_edit(self, path, checkpoint=None) -> None:
        super().load_edit(path, checkpoint)
        self.__dict__["_undo_snapshots"] = []
