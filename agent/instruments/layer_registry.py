"""The layers instrument's module registry: global module ids, model roots and their trees.

Every module seen gets a global id, unique across every model of the session; a model root seen
for the first time sends its ``ModelTree`` (and again when a module called inside it was not in
its tree). ``LayerRegistry`` is a mixin of ``LayersInstrument`` (agent/instruments/layers.py): its
state lives in the instrument's ``__init__``.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from llmtop.protocol.events import Event, Metric, ModelTree


class LayerRegistry:
    """Module ids and paths, model roots, tree emission, torch.compile metrics (mixin)."""

    def module_ids(self) -> weakref.WeakKeyDictionary:
        """``nn.Module -> global id`` for every module seen so far (live modules only)."""
        out: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for gid, ref in enumerate(list(self._mods)):
            mod = ref()
            if mod is not None:
                out[mod] = gid
        return out

    def module_paths(self) -> dict[int, str]:
        """``global id -> module path`` (path inside its model, "" for a root)."""
        return dict(enumerate(list(self._paths)))
    # ----------------------------------------------------------------- root calls (agent/instruments/roots.py)

    def _root_start(self, module: Any, t0: int) -> None:
        """Every root call, sampled or not: a model seen for the first time sends its tree."""
        if self._dead or id(module) in self._by_addr:
            return
        try:
            self._new_root(module)
        except Exception as exc:
            self._fail("root call", exc)

    def _root_done(self, module: Any, t0: int, t1: int) -> None:
        if self._dirty and not self._dead:
            gid = self._by_addr.get(id(module))
            if gid in self._dirty:
                self._dirty.discard(gid)
                try:
                    self._emit_tree(gid, module)
                except Exception as exc:
                    self._fail("root call", exc)

    def _root_error(self, module: Any) -> None:
        """A root call raised: an out-of-memory error is reported with the root, unless a module
        inside it (a sampled step) named it already."""
        gid = self._by_addr.get(id(module))
        if gid is not None and not self._dead:
            self._on_forward_error(module, gid)
    # ----------------------------------------------------------------- model discovery

    def _assign(self, module: Any, path: str, root_gid: int) -> int:
        gid = self._n
        self._n += 1
        addr = id(module)
        by_addr = self._by_addr

        def gone(_ref: Any, addr: int = addr, gid: int = gid) -> None:
            if by_addr.get(addr) == gid:
                del by_addr[addr]

        self._mods.append(weakref.ref(module, gone))
        self._paths.append(path)
        self._classes.append(type(module).__name__)
        self._root_of.append(root_gid if root_gid >= 0 else gid)
        self._param_end.append(0)
        by_addr[addr] = gid
        self._acc.grow(self._n)
        return gid

    def _new_module(self, module: Any, parent_gid: int, root_gid: int) -> int:
        """A module called inside a model but not in its tree (created late or held elsewhere)."""
        name = f"{self._paths[parent_gid]}.({type(module).__name__})".lstrip(".")
        gid = self._assign(module, name, root_gid)
        self._extra.setdefault(root_gid, []).append(gid)
        self._extra_parent[gid] = parent_gid
        self._dirty.add(root_gid)
        return gid

    def _new_root(self, module: Any) -> int:
        gid = self._by_addr.get(id(module))
        known = gid is not None  # part of a model already sent: no second tree for it
        if gid is None:
            gid = self._assign(module, "", -1)
        self._roots[gid] = self._next_model
        self._next_model += 1
        if not self._private and not known:
            self._emit_tree(gid, module)
        return gid

    def _emit_tree(self, root_gid: int, root: Any) -> None:
        # no torch.compile'd module can exist before dynamo is imported (importing it takes seconds)
        optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())

        ids: list[int] = []
        paths: list[str] = []
        classes: list[str] = []
        params: list[int] = []
        parents: list[int] = []
        trainable: list[bool] = []
        dtypes: list[str] = []
        compiled: list[bool] = []
        by_path: dict[str, int] = {}
        counted: set[int] = set()  # a tied parameter (embedding and LM head) is counted once, where first met
        for path, mod in root.named_modules():
            gid = self._by_addr.get(id(mod))
            if gid is None:
                gid = self._assign(mod, path, root_gid)
            elif gid in self._extra_parent and path:
                # first seen being called before it was in the tree: now it has a real path
                del self._extra_parent[gid]
                for extras in self._extra.values():
                    if gid in extras:
                        extras.remove(gid)
                self._paths[gid] = path
            by_path[path] = gid
            parent = -1 if path == "" else by_path.get(path.rpartition(".")[0], root_gid)
            own = list(mod.parameters(recurse=False))
            sizes: dict[str, int] = {}
            for p in own:
                key = str(p.dtype).removeprefix("torch.")
                sizes[key] = sizes.get(key, 0) + p.numel()
            # torch.compile(module) wraps it; module.compile() compiles it in place
            is_compiled = isinstance(mod, optimized) or getattr(mod, "_compiled_call_impl", None) is not None
            self._compiled_seen = self._compiled_seen or is_compiled
            ids.append(gid)
            paths.append(path)
            classes.append(type(mod).__name__)
            params.append(sum(p.numel() for p in own if id(p) not in counted))
            counted.update(id(p) for p in own)
            parents.append(parent)
            trainable.append(any(p.requires_grad for p in own))
            dtypes.append(max(sizes, key=sizes.__getitem__) if sizes else "")
            compiled.append(is_compiled)
        for gid in self._extra.get(root_gid, []):
            if gid in ids:
                continue
            ids.append(gid)
            paths.append(self._paths[gid])
            classes.append(self._classes[gid])
            params.append(0)
            parents.append(self._extra_parent.get(gid, root_gid))
            trainable.append(False)
            dtypes.append("")
            compiled.append(False)
        self.ctx.emit(
            ModelTree(
                model=self._roots[root_gid],
                name=type(root).__name__,
                ids=ids,
                paths=paths,
                classes=classes,
                params=params,
                parents=parents,
                trainable=trainable,
                dtypes=dtypes,
                compiled=compiled,
            )
        )

    # ----------------------------------------------------------------- torch.compile

    def _compile_metrics(self, now: float) -> list[Event]:
        """torch.compile's total compile time and recompilations (frames compiled again)."""
        try:
            from torch._dynamo.utils import compilation_time_metrics
        except Exception:
            return []
        compile_s = float(sum(sum(v) for v in list(compilation_time_metrics.values())))
        try:  # per-frame compile counts: a count above one is a recompilation
            from torch._dynamo.convert_frame import FRAME_COMPILE_COUNTER

            recompiles = float(sum(n - 1 for n in list(FRAME_COMPILE_COUNTER.values()) if n > 1))
        except Exception:
            recompiles = -1.0
        if (compile_s, recompiles) == self._compile_last:
            return []
        self._compile_last = (compile_s, recompiles)
        step = self._ctx_step()
        out: list[Event] = [Metric(name="compile_time_s", value=compile_s, t=now, step=step)]
        if recompiles >= 0:
            out.append(Metric(name="recompilations", value=recompiles, t=now, step=step))
        return out
