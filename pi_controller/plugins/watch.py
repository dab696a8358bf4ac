"""Hot reload: follow the plugins folder and swap plugins in between two ticks.

Why inotify (through asyncinotify, a small pure-Python asyncio binding) rather than polling or
watchfiles: it tells *how* a file changed. A file is only looked at once its writer has closed it
(CLOSE_WRITE) or once it has been renamed into the folder (MOVED_TO) or linked there (CREATE of a
symlink), so a file still being written, however slowly and in however many writes, is never read;
polling mtimes can only guess from a pause in the writes, and watchfiles (Rust notify) folds both
into "modified"/"added". A rename,
the atomic way to install a file, is acted on at once; a close is given `settle_s` for a writer that
closes and reopens. The daemon runs on Linux only (gpiozero on lgpio, systemd), where inotify is.

Work off the event loop: reading and compiling (~3 ms with wasmtime's cache warm, ~100 ms cold) and
health checks run on a worker thread (`PluginSet.prepare`); only the swap (`PluginSet.apply`) runs,
between two ticks, through `ControlLoop.between_ticks`. So a tick never waits for a compile, and
never sees half an old and half a new set of plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Callable

import structlog
from asyncinotify import Event, Inotify, Mask, Watch

from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.plugin_set import PluginSet, Update
from pi_controller.reloads import Gap, prepared

log = structlog.get_logger("pi_controller.plugins")

_WATCHED = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.CREATE | Mask.ONLYDIR
_AT_ONCE = Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE
_GONE = Mask.DELETE_SELF | Mask.MOVE_SELF  # the watched folder itself was deleted or moved away
_ANCESTOR = Mask.CREATE | Mask.MOVED_TO | _GONE | Mask.ONLYDIR  # what may bring a missing folder back
_SUFFIXES = (".wasm", ".yaml", ".sig")  # a plugin, its manifest and its signature
_EVERYTHING = ""  # scheduled as a name (none is empty): every plugin of the folder, listed off the loop


class PluginWatcher:
    def __init__(self, plugins: PluginSet, loop: Gap, swapped: Callable[[], None] | None = None,
                 folder: Callable[[str], None] | None = None, rescan: bool = False, settle_s: float = 0.05):
        """`swapped`: called after each swap, between two ticks; `folder`: with the name of a subfolder
        that came or went; `rescan`: look at every file once watching (a set loaded before the watch
        began, which files may have reached unseen)."""
        self._plugins = plugins
        self._loop = loop
        self._swapped = swapped
        self._folder = folder
        self._rescan = rescan
        self._settle_s = settle_s
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._due: set[str] = set()
        self._wake = asyncio.Event()
        self._inotify: Inotify | None = None
        self._watch: Watch | None = None  # on the folder, while it is there
        self._ancestor: Watch | None = None  # on its nearest existing ancestor, while the folder is gone
        self._search: asyncio.Task[None] | None = None  # the folder looked for on a worker thread (`_look_for_folder`)
        self._again = False  # an event came while it was looked for: look once more
        self._links: set[asyncio.Task[None]] = set()  # files created, each looked at on a worker thread (`_created`)

    async def run(self) -> None:
        """Until cancelled: note what lands in the folder, and reload it. A folder deleted or moved away
        unloads its plugins; its nearest existing ancestor is then watched until it is back, and its
        plugins are loaded again."""
        directory = self._plugins.directory
        try:
            inotify = Inotify()
        except OSError as exc:
            log.error("plugins_watch_unavailable", directory=str(directory), error=str(exc),
                      note="plugins change on SIGHUP only")
            return
        with inotify:
            self._inotify = inotify
            try:
                self._watch, self._ancestor = await asyncio.to_thread(_search, inotify, directory, None)
            except OSError as exc:  # no more watches allowed (fs.inotify.max_user_watches), ...
                log.error("plugins_watch_unavailable", directory=str(directory), error=str(exc),
                          note="plugins change on SIGHUP only")
                return
            if self._watch is not None:
                log.info("plugins_watching", directory=str(directory))
                if self._rescan:
                    self._look_at_everything()
            else:
                self._gone()
            reloads = asyncio.create_task(self._reload_forever())
            self._plugins.on_room = self._look_at  # plugins refused for want of room, once there is some
            try:
                async for event in inotify:
                    self._route(event)
            finally:
                self._plugins.on_room = None
                for task in (reloads, self._search, *self._links):
                    if task is not None:
                        task.cancel()
                for timer in self._timers.values():
                    timer.cancel()

    def _route(self, event: Event) -> None:
        folder = self._watch is not None and event.watch is self._watch
        if self._search is not None and not (folder and not event.mask & _GONE):
            self._again = True  # perhaps of a watch the search took, not taken up here yet: it looks once more
        elif Mask.Q_OVERFLOW in event.mask and self._watch is None:  # events were lost: look again
            self._look_for_folder()
        elif Mask.Q_OVERFLOW in event.mask:
            self._look_at_everything()
        elif self._watch is not None and event.watch is self._watch and event.mask & _GONE:
            self._gone()
        elif self._watch is not None and event.watch is self._watch:
            self._note(event)
        elif self._ancestor is not None and event.watch is self._ancestor:
            if event.mask & _GONE:
                self._drop_ancestor()
            self._look_for_folder()

    def _gone(self) -> None:
        """The folder was deleted or moved away: its plugins are unloaded, and it is waited for."""
        assert self._inotify is not None
        if self._watch is not None:
            with contextlib.suppress(OSError):  # the kernel drops a deleted folder's watch itself
                self._inotify.rm_watch(self._watch)  # one moved elsewhere is watched no more
            self._watch = None
        log.error("plugins_folder_gone", directory=str(self._plugins.directory),
                  note="its plugins are unloaded; they are loaded again when it is back")
        self._look_at(set(self._plugins.status))
        self._look_for_folder()

    def _look_for_folder(self) -> None:
        """While the folder is gone: back, watch it again and load what it holds; else watch the nearest
        ancestor that exists (again after each change to it: the folder may come back a level at a time). Looked
        for on a worker thread (`_search`): the folder may be on a hung or slow mount."""
        if self._search is None:
            self._search = asyncio.create_task(self._find_folder(), name="plugins-folder-search")

    async def _find_folder(self) -> None:
        assert self._inotify is not None
        try:
            again = True
            while again:  # an event of a watch the worker took, come before it was taken up here, is looked at again
                self._again = False
                found, self._ancestor = await asyncio.to_thread(
                    _search, self._inotify, self._plugins.directory, self._ancestor)
                if found is not self._watch:  # found by a look before, gone again since
                    _drop(self._inotify, self._watch)
                self._watch, again = found, self._again
        except OSError as exc:  # no more watches allowed (fs.inotify.max_user_watches), ...
            log.error("plugins_watch_unavailable", directory=str(self._plugins.directory), error=str(exc),
                      note="plugins change on SIGHUP only, until the folder's ancestor changes again")
            return
        finally:
            self._search = None
        if self._watch is None:
            return
        log.warning("plugins_folder_back", directory=str(self._plugins.directory))
        self._look_at_everything(self._settle_s)  # a folder being copied in: a file still written waits its close
        if self._folder is not None:  # listed once its watch is taken up here: one made since is an event of it
            for name in await asyncio.to_thread(_subfolders, self._plugins.directory):
                self._folder(name)

    def _drop_ancestor(self) -> None:
        if self._inotify is not None:
            _drop(self._inotify, self._ancestor)
        self._ancestor = None

    def _note(self, event: Event) -> None:
        name = event.name
        if name is not None and Mask.ISDIR in event.mask:
            if self._folder is not None and event.mask & (Mask.CREATE | _AT_ONCE):
                self._folder(name.name)
            return
        if name is None or name.suffix not in _SUFFIXES or name.name.startswith("."):
            return
        if Mask.CREATE in event.mask:  # a file being written: its close says when it is whole; a link is whole at once
            if event.path is not None:
                self._created(event.path)
            return
        # A renamed or deleted module is whole at once. A manifest or signature waits `settle_s` for its
        # module: `plugin install` renames the manifest and signature, then the module, and the pair is loaded
        # as one, never the new manifest with the old module.
        at_once = event.mask & _AT_ONCE and name.suffix == ".wasm"
        self._schedule(name.stem, 0.0 if at_once else self._settle_s)

    def _created(self, path: Path) -> None:
        """A file created: looked at once on a worker thread (the folder may be on a hung or slow mount), and
        reloaded after `settle_s`, as a manifest waits for its module, if it is a link."""
        async def look() -> None:
            if await asyncio.to_thread(path.is_symlink):
                self._schedule(path.stem, self._settle_s)

        task = asyncio.create_task(look())
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    def _look_at_everything(self, delay: float = 0.0) -> None:
        """Each plugin file, as if it had just landed (one unchanged is left as it is), and each plugin
        loaded, as if its file had gone (one still there stays). The folder is listed when the time is up, on a
        worker thread (`_everything`): it may be on a hung or slow mount."""
        self._schedule(_EVERYTHING, delay)

    def _look_at(self, names: set[str], delay: float = 0.0) -> None:
        for name in names:
            self._schedule(name, delay)

    def _schedule(self, name: str, delay: float) -> None:
        """Reload `name` after `delay`; a later event for it starts the wait again."""
        if name in self._timers:
            self._timers.pop(name).cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._ready, name)

    def _ready(self, name: str) -> None:
        del self._timers[name]
        self._due.add(name)
        self._wake.set()

    async def _reload_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            names, self._due = self._due, set()
            try:
                if _EVERYTHING in names:
                    names = names - {_EVERYTHING} | await self._everything()
                await self.reload(names)
            except Exception as exc:  # one bad batch must not end hot reload for good
                log.error("plugin_reload_failed", plugins=sorted(names), error=f"{type(exc).__name__}: {exc}")

    async def _everything(self) -> set[str]:
        """Each plugin of the folder, listed on a worker thread, and each loaded; not one whose file is still
        waited for (written, or waiting for its module): its own time comes."""
        listed = await asyncio.to_thread(plugin_folder.modules, self._plugins.directory)
        return {*listed, *self._plugins.status} - set(self._timers)

    async def reload(self, names: set[str]) -> None:
        """Prepare `names` on a worker thread, then apply them between two ticks."""
        plugins, generation = self._plugins, self._plugins.generation

        def prepare() -> Update:  # the folder listed here too, not in the gap: it may be on a hung mount
            update = plugins.prepare(names)
            update.listed = plugin_folder.modules(plugins.directory)
            return update

        update = await prepared(prepare, Update.close)

        def swap() -> None:
            if plugins.generation == generation:
                plugins.apply(update)
                if self._swapped is not None:
                    self._swapped()
            else:  # a SIGHUP reload replaced the whole set meanwhile, from the folder as it read it: perhaps before
                update.close()  # these files changed. Looked at again, against that set (the same: nothing to swap)
                self._look_at(names)

        await self._loop.in_gap(swap, update.close)


def _search(inotify: Inotify, directory: Path, ancestor: Watch | None) -> tuple[Watch | None, Watch | None]:
    """On a worker thread (each step may stat a hung mount): the watch on `directory` if it is there (the
    `ancestor`'s dropped), else none and the watch on its nearest existing ancestor. Each ancestor is watched
    before the folder is looked for again: one made after a look is either seen then or an event of the watch."""
    while True:
        try:
            watch = inotify.add_watch(directory, _WATCHED | _GONE)
        except (FileNotFoundError, NotADirectoryError):
            pass
        else:
            _drop(inotify, ancestor)
            return watch, None
        nearest = _nearest_existing(directory)
        if ancestor is not None and ancestor.path == nearest:
            return None, ancestor
        _drop(inotify, ancestor)
        try:
            ancestor = inotify.add_watch(nearest, _ANCESTOR)
        except (FileNotFoundError, NotADirectoryError):  # gone meanwhile: look again
            ancestor = None


def _drop(inotify: Inotify, watch: Watch | None) -> None:
    if watch is not None:
        with contextlib.suppress(OSError):  # deleted: already dropped
            inotify.rm_watch(watch)


def _subfolders(folder: Path) -> list[str]:
    """The names of `folder`'s subfolders (none if it is gone again: its watch says so)."""
    try:
        return [sub.name for sub in folder.iterdir() if sub.is_dir()]
    except OSError:
        return []


def _nearest_existing(path: Path) -> Path:
    """`path`'s nearest ancestor that is a folder (the root at worst)."""
    for ancestor in path.parents:
        if ancestor.is_dir():
            return ancestor
    return Path(path.anchor)
