"""The sans-IO core of a guarded stream: a synchronous state machine, in the shape of h11.

Events go in as method calls, with plain data and the current time; actions come out in
``Core.actions``, in order, for a driver to carry out. The core never awaits, never starts a
task and never looks at a clock of its own, so it is tested with plain synchronous tables.

Events in: an upstream item (:meth:`Core.feed`, text already taken out of its shape by an
adapter), a verdict for a ticket (:meth:`Core.verdict`), the provider's own moderation
(:meth:`Core.provider_moderation`), a clock tick (:meth:`Core.tick`), upstream ended or failed
(:meth:`Core.end`, :meth:`Core.fail`), the consumer gone (:meth:`Core.gone`).

Actions out: :class:`Moderate` (send this text to the moderator, answer with its ticket),
:class:`Release` (send this original item on, unchanged or with an :class:`Edit`),
:class:`CutFinish` (end this choice with ``content_filter``), :class:`EmitUsage`,
:class:`Notify` (call a user hook), :class:`CloseUpstream`, :class:`Finished` (the last action).
Whether to read more is :attr:`Core.wants_input`; when to tick is :meth:`Core.next_deadline`.

Invariant (hold-back): a character of a channel is released only once every window of that
channel up to the one holding it has a settled clean verdict; a flagged window's text is never
released (cut-off) or is replaced (redact). Tool-call arguments are held until the whole call is
judged, so a flagged call is never emitted, not even its name. Items leave in upstream order
within a choice; an item without a choice keeps its place relative to every choice.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..exceptions import ModerationError, StreamFormatError, StreamTimeout
from ..moderation._base import Verdict
from ..policy import Policy
from ..report import Flag, GuardReport, Span, VerdictEvent
from ..window import Window, WindowBuffer
from .choice import Channel, ChoiceState, Item, Piece, is_tool

__all__ = [
    "CloseUpstream",
    "Core",
    "CutFinish",
    "Edit",
    "EmitUsage",
    "Finished",
    "Moderate",
    "Notify",
    "Release",
    "TextPart",
]

#: One text of an incoming item: (channel key, delta field, text).
TextPart = tuple[str, str, str]

_INPUT = -1  # the ticket of the request's input

#: Tool-call arguments are held whole until judged; past this many characters held, the stream
#: fails (memory stays bounded) rather than pass a call on unjudged.
MAX_TOOL_CHARS = 1 << 22

# Released text is handed to the usage counter in batches of about this many characters.
_SHOWN_BATCH = 2048


@dataclass(frozen=True, slots=True)
class Moderate:
    """Send ``text`` to the moderator; answer with :meth:`Core.verdict` and ``ticket``."""

    ticket: int
    text: str


@dataclass(frozen=True, slots=True)
class Edit:
    """How to change an item before it goes out.

    ``texts`` maps (channel key, delta field) to the text to put there; ``drop`` names channels
    whose delta entries are removed whole (a tool call that is never emitted).
    """

    choice: int
    texts: Mapping[tuple[str, str], str]
    drop: frozenset[str]
    finish: str | None
    drop_logprobs: bool = True


class Release:
    """Send ``original`` on: unchanged when ``edit`` is None.

    A plain slotted class, not a frozen dataclass: one is made per released chunk (the hot path).
    """

    __slots__ = ("choice", "edit", "original")

    def __init__(self, original: Any, edit: Edit | None, choice: int | None) -> None:
        self.original = original
        self.edit = edit
        self.choice = choice

    def __repr__(self) -> str:
        return f"Release(original={self.original!r}, edit={self.edit!r}, choice={self.choice!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Release):
            return NotImplemented
        return (self.original, self.edit, self.choice) == (other.original, other.edit, other.choice)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class CutFinish:
    """End choice ``choice`` with ``finish_reason="content_filter"`` (``template``: its first item)."""

    choice: int
    template: Any


@dataclass(frozen=True, slots=True)
class EmitUsage:
    """Send a usage record (the driver builds it; ``template``: an item to copy identity from)."""

    template: Any


@dataclass(frozen=True, slots=True)
class Notify:
    """Call the user's ``on_verdict`` or ``on_flag`` hook with ``arg``."""

    hook: Literal["verdict", "flag"]
    arg: Any


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Stop reading and close upstream: nothing more is wanted from it."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The stream is over: no action follows. ``error`` is what the consumer gets, if anything."""

    error: BaseException | None


Action = Moderate | Release | CutFinish | EmitUsage | Notify | CloseUpstream | Finished

#: Counts text for usage: (choice, channel key, text, shown).
Counter = Callable[[int, str, str, bool], None]


class Core:
    """The state machine of one guarded stream. See the module docstring.

    Args:
        policy: What to do.
        n: How many choices were asked for (upstream is closed after a cut-off only once this
            many have ended).
        input_text: The request's text to moderate (``Policy.moderate_input``), or None.
        now: The current time, in seconds of any monotonic clock.
        count: Called with every text generated and every text released, for token usage.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        n: int = 1,
        input_text: str | None = None,
        input_truncated: bool = False,
        now: float = 0.0,
        count: Counter | None = None,
    ) -> None:
        self.policy = policy
        self.actions: deque[Action] = deque()
        self._holdback = policy.mode == "holdback"
        self.max_held = policy.max_held_chars or 8 * policy.window_chars
        self._n = max(1, n)
        self._count = count
        self._choices: dict[int, ChoiceState] = {}
        self._loose: deque[Item] = deque()
        self._seq = 0
        self._tickets: dict[int, tuple[Channel, Window]] = {}
        self._next_ticket = 0
        self._held = 0  # text held that verdicts can free (reading stops at max_held)
        self._held_tool = 0  # tool-call text held until its call is complete (bounded apart)
        self._started = now
        self._last_text = now
        self._paused_at: float | None = None
        self.paused_seconds = 0.0
        self._template: Any = None
        self._upstream_done = False
        self._upstream_error: BaseException | None = None
        self._error: BaseException | None = None
        self._close_sent = False
        self.finished = False
        self.upstream_usage = False
        # input moderation
        self._input_pending = False
        self._input_flagged = False
        self._input_chars = 0
        self._input_truncated = input_truncated
        # report
        self._flags: list[Flag] = []
        self._calls = 0
        self._moderated_chars = 0
        self._leaked = 0
        self._unmoderated: list[Span] = []
        self._latencies: list[float] = []
        self._released_chars = 0
        self._generated_chars = 0
        self._dropped: list[str] = []
        if input_text:
            self._input_pending = True
            self._input_chars = len(input_text)
            self.actions.append(Moderate(_INPUT, input_text))
            self._moderated_chars += len(input_text)

    # -- events ------------------------------------------------------------------------------

    def feed(
        self,
        original: Any,
        choice: int | None,
        texts: Iterable[TextPart] = (),
        *,
        finish: str | None = None,
        opens: Iterable[str] = (),
        now: float,
    ) -> None:
        """An upstream item: ``original`` carries ``texts`` of choice ``choice`` (None: no choice).

        ``opens`` names tool channels whose call starts in this item (its id and name travel with
        it); ``finish`` is the choice's finish reason, if this item ends it.
        """
        if (
            choice is not None
            and finish is None
            and not opens
            and self._holdback
            and self._error is None
            and not self._loose
            and len(texts) == 1  # type: ignore[arg-type]
        ):
            # The hot path: one more text delta of a running channel, behind text this choice holds.
            st = self._choices.get(choice)
            if st is not None and st.items and not st.cut:
                key, field, text = texts[0]  # type: ignore[index]
                ch = st.channels.get(key)
                if ch is not None and not ch.tool and text:
                    buffer = ch.buffer
                    start = buffer.total
                    n = len(text)
                    self._seq += 1
                    st.items.append(
                        Item(self._seq, original, choice, [Piece(ch, start, start + n, text, field)], None, (), n)
                    )
                    ch.last_text_at = now
                    windows = buffer.feed(text)
                    if windows:
                        for window in windows:
                            self._submit(ch, window)
                    self._held += n
                    self._generated_chars += n
                    self._last_text = now
                    if self._held >= self.max_held:
                        for other in st.channels.values():
                            self._flush(other)
                        self._update_pause(now)
                    return
        if self.finished:
            return
        self._seq += 1
        if self._template is None:
            self._template = original
        if choice is None:
            self._loose.append(Item(self._seq, original, None, []))
            self._release_all()
            return
        st = self._choices.get(choice)
        if st is None:
            st = self._choices[choice] = ChoiceState(choice, original)
            if self._input_flagged or self._error is not None:
                self._cut(st, None, 0)
        if st.cut:
            for key, _field, text in texts:  # generated (billed) but never shown
                self._generated_chars += len(text)
                if self._count is not None:
                    self._count(choice, key, text, False)
            self._release_all()
            return
        pieces: list[Piece] = []
        size = tool_size = 0
        channels = st.channels
        for key, field, text in texts:
            if not text:
                continue
            ch = channels.get(key)
            if ch is None:
                ch = self._open_channel(st, key)
            buffer = ch.buffer
            start = buffer.total
            pieces.append(Piece(ch, start, start + len(text), text, field))
            if ch.tool:
                self._close_earlier_tools(st, ch)
                tool_size += len(text)
            else:
                size += len(text)
            ch.last_text_at = now
            windows = buffer.feed(text)
            if windows:
                for window in windows:
                    self._submit(ch, window)
        opened: list[Channel] = []
        if opens:
            for key in opens:
                ch = channels.get(key) or self._open_channel(st, key)
                self._close_earlier_tools(st, ch)
                opened.append(ch)
        if size or tool_size:
            self._held += size
            self._held_tool += tool_size
            self._generated_chars += size + tool_size
            self._last_text = now
            if self._held_tool > MAX_TOOL_CHARS:
                st.items.append(Item(self._seq, original, choice, pieces, finish, tuple(opened), size, tool_size))
                self._fail(StreamFormatError(f"a tool call's arguments are longer than {MAX_TOOL_CHARS} characters"))
                return
        elif not opened:
            # A delta without text ends a run of text: judge what is buffered now, don't wait.
            for ch in st.channels.values():
                self._flush(ch)
        st.items.append(Item(self._seq, original, choice, pieces, finish, tuple(opened), size, tool_size))
        if finish is not None:
            st.finished = True
            st.finish_reason = finish
            for ch in st.channels.values():
                ch.closed = True
                self._flush(ch)
        elif self._held >= self.max_held:
            # Reading stops at the cap: moderate what is buffered so verdicts can free room.
            for ch in st.channels.values():
                self._flush(ch)
        if self._holdback and size and finish is None and len(st.items) > 1 and not self._loose:
            # Hold-back: new text waits for its verdict, behind what this choice holds already.
            if self._held >= self.max_held:
                self._update_pause(now)
            return
        self._release_all()
        self._update_pause(now)

    def verdict(self, ticket: int, result: Verdict | BaseException, latency: float, *, now: float) -> None:
        """The moderator's answer (or failure) for ``ticket``."""
        self.verdicts([(ticket, result)], latency, now=now)

    def verdicts(self, results: Iterable[tuple[int, Verdict | BaseException]], latency: float, *, now: float) -> None:
        """Answers for several tickets from one moderation call (released once, after all settle)."""
        if self.finished:
            return
        for ticket, result in results:
            if self.finished:
                return
            self._calls += 1
            self._latencies.append(latency)
            if ticket == _INPUT:
                self._on_input_verdict(result, latency)
                continue
            entry = self._tickets.pop(ticket, None)
            if entry is None:
                continue
            ch, window = entry
            st = self._choices[ch.choice]
            if st.cut:
                continue
            ch.results[window.seq] = (result, latency)
            while ch.next_settle in ch.results and not st.cut and self._error is None:
                outcome, took = ch.results.pop(ch.next_settle)
                w = ch.pending.pop(ch.next_settle)
                ch.next_settle += 1
                self._settle(st, ch, w, outcome, took)
        self._release_all()
        self._update_pause(now)

    def provider_moderation(self, results: list[Verdict]) -> None:
        """The provider's own output moderation (``moderation=`` on the request): result i is choice i."""
        for i, verdict in enumerate(results):
            decision = self.policy.judge(verdict)
            st = self._choices.get(i)
            if decision is None or st is None or st.cut:
                continue
            total = sum(ch.buffer.total for ch in st.channels.values())
            released = sum(ch.released for ch in st.channels.values())
            flag = Flag(
                choice=i,
                start=0,
                end=total,
                context_start=0,
                category=decision.category,
                score=decision.score,
                categories=dict(decision.categories),
                scores=dict(decision.scores),
                action=self.policy.action,
                source="upstream",
            )
            self._flags.append(flag)
            self._leaked += released  # shown before the provider's verdict arrived
            if self.policy.action == "cutoff":
                self._cut(st, None, 0)
            else:
                # Whatever of this choice is not out yet, and whatever follows, is replaced.
                for ch in st.channels.values():
                    ch.redactions.append((ch.released, 1 << 62))
                    if ch.tool:
                        ch.redact_all = True
            self.actions.append(Notify("flag", flag))
        self._release_all()

    def tick(self, now: float) -> None:
        """Time passed: moderate windows quiet for ``flush_after``; enforce the deadlines."""
        if self.finished:
            return
        p = self.policy
        if p.max_duration is not None and now - self._started >= p.max_duration:
            self._fail(StreamTimeout(f"the stream ran longer than max_duration={p.max_duration}s"))
            return
        if (
            p.idle_timeout is not None
            and not self._upstream_done
            and self._paused_at is None
            and now - self._last_text >= p.idle_timeout
        ):
            self._fail(StreamTimeout(f"upstream sent no text for idle_timeout={p.idle_timeout}s"))
            return
        for st in self._choices.values():
            if st.cut:
                continue
            for ch in st.channels.values():
                if ch.buffer.pending and now - ch.last_text_at >= p.flush_after:
                    self._flush(ch)
        self._release_all()

    def end(self, *, now: float = 0.0) -> None:
        """Upstream ended (or was closed because every choice was cut)."""
        if self.finished or self._upstream_done:
            return
        self._upstream_done = True
        self._paused_at = None
        for st in self._choices.values():
            if not st.cut:
                st.finished = True
                for ch in st.channels.values():
                    ch.closed = True
                    self._flush(ch)
        self._release_all()

    def fail(self, error: BaseException, *, now: float = 0.0) -> None:
        """Upstream failed: judge what it did send, release what is clean, then end with ``error``."""
        if self.finished:
            return
        self._upstream_error = error
        self.end(now=now)

    def error(self, error: BaseException) -> None:
        """Something outside the core failed (e.g. a user hook raised): end with ``error``."""
        self._fail(error)

    def gone(self) -> None:
        """The consumer left: nothing more goes out."""
        if self.finished:
            return
        self._finish(None)

    # -- queries -----------------------------------------------------------------------------

    @property
    def wants_input(self) -> bool:
        """Whether the driver should read upstream now (False at the held-text cap, or when done)."""
        return not self._upstream_done and not self.finished and self._held < self.max_held

    @property
    def held_chars(self) -> int:
        """Text read from upstream and not yet released (or dropped)."""
        return self._held

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should next be called, or None if no timer is due."""
        if self.finished:
            return None
        p = self.policy
        due: list[float] = []
        for st in self._choices.values():
            if st.cut:
                continue
            for ch in st.channels.values():
                if ch.buffer.pending:
                    due.append(ch.last_text_at + p.flush_after)
        if p.idle_timeout is not None and not self._upstream_done and self._paused_at is None:
            due.append(self._last_text + p.idle_timeout)
        if p.max_duration is not None:
            due.append(self._started + p.max_duration)
        return min(due) if due else None

    def report(self, *, usage: Any = None, usage_source: Any = None, shown_tokens: int = 0) -> GuardReport:
        """A snapshot of what happened so far."""
        watermarks: dict[int, int] = {}
        for i, st in sorted(self._choices.items()):
            content = st.channels.get("content")
            watermarks[i] = content.settled if content is not None else 0
        return GuardReport(
            flags=tuple(self._flags),
            moderation_calls=self._calls,
            moderated_chars=self._moderated_chars,
            generated_chars=self._generated_chars,
            released_chars=self._released_chars,
            leaked_chars=self._leaked,
            watermarks=watermarks,
            finish_reasons={i: s.finish_reason for i, s in sorted(self._choices.items())},
            unmoderated=tuple(self._unmoderated),
            latencies=tuple(self._latencies),
            usage=usage,
            usage_source=usage_source,
            shown_completion_tokens=shown_tokens,
            input_moderated_chars=self._input_chars,
            input_truncated=self._input_truncated,
            error=self._error if self._error is not None else self._upstream_error_if_raised(),
            paused_seconds=self.paused_seconds,
            dropped=tuple(self._dropped),
        )

    def drop_field(self, name: str) -> None:
        """An adapter dropped a field or event it does not know (it may carry text): reported."""
        if name not in self._dropped:
            self._dropped.append(name)

    # -- windows and verdicts ----------------------------------------------------------------

    def _open_channel(self, st: ChoiceState, key: str) -> Channel:
        p = self.policy
        buffer = WindowBuffer(
            window_chars=p.window_chars,
            first_window_chars=p.first_window_chars,
            growth=p.window_growth,
            overlap_chars=p.overlap_chars,
        )
        ch = st.channels[key] = Channel(st.index, key, buffer, is_tool(key))
        return ch

    def _close_earlier_tools(self, st: ChoiceState, ch: Channel) -> None:
        """Tool calls stream one after another: a new call's start ends the ones before it."""
        if not ch.key.startswith("tool:") or ch.closed:
            return
        index = int(ch.key[5:])
        for other in st.channels.values():
            if other.tool and not other.closed and other.key.startswith("tool:") and int(other.key[5:]) < index:
                other.closed = True
                self._flush(other)

    def _count_shown(self, ch: Channel) -> None:
        if self._count is not None and ch.shown:
            self._count(ch.choice, ch.key, "".join(ch.shown), True)
        ch.shown.clear()
        ch.shown_size = 0

    def flush_counts(self) -> None:
        """Hand every released text not yet counted to the usage counter (before reading it)."""
        for st in self._choices.values():
            for ch in st.channels.values():
                if ch.shown:
                    self._count_shown(ch)

    def _count_unwindowed(self, st: ChoiceState) -> None:
        """Text of ``st`` not in a window yet will never be: count it as generated now."""
        if self._count is None:
            return
        for ch in st.channels.values():
            text = ch.buffer.pending_text()
            if text:
                self._count(st.index, ch.key, text, False)

    def _flush(self, ch: Channel) -> None:
        window = ch.buffer.flush()
        if window is not None:
            self._submit(ch, window)

    def _submit(self, ch: Channel, window: Window) -> None:
        if self._count is not None:
            # Generated text is counted a window at a time: windows cover each channel's text once.
            self._count(ch.choice, ch.key, window.new_text, False)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets[ticket] = (ch, window)
        ch.pending[window.seq] = window
        self._moderated_chars += len(window.text)
        self.actions.append(Moderate(ticket, window.text))

    def _settle(self, st: ChoiceState, ch: Channel, w: Window, outcome: Verdict | BaseException, took: float) -> None:
        flag: Flag | None = None
        error: BaseException | None = None
        if isinstance(outcome, BaseException):
            error = outcome
            if self.policy.on_error == "fail_closed":
                self.actions.append(Notify("verdict", _event(st.index, w, None, took, error, ch.key)))
                self._fail(_moderation_error(outcome, "moderator failed"))
                return
            self._unmoderated.append(Span(st.index, w.start, w.end, repr(outcome), ch.key))
            ch.settled = w.end
        else:
            decision = self.policy.judge(outcome)
            floor = ch.context_floor
            if decision is not None and w.context_start < floor <= w.start:
                # Its context holds a span we already redacted: judge the window again without it.
                retry = Window(w.seq, w.start, w.end, floor, w.text[floor - w.context_start :])
                ch.next_settle -= 1
                ticket = self._next_ticket
                self._next_ticket += 1
                self._tickets[ticket] = (ch, retry)
                ch.pending[w.seq] = retry
                self._moderated_chars += len(retry.text)
                self.actions.append(Moderate(ticket, retry.text))
                return
            if decision is None:
                ch.settled = w.end
            else:
                flag = Flag(
                    choice=st.index,
                    start=w.start,
                    end=w.end,
                    context_start=w.context_start,
                    category=decision.category,
                    score=decision.score,
                    categories=dict(decision.categories),
                    scores=dict(decision.scores),
                    action=self.policy.action,
                    channel=ch.key,
                )
                self._flags.append(flag)
                if self.policy.action == "cutoff":
                    self._leaked += max(0, ch.released - w.start)
                    self._cut(st, ch, w.start)
                else:
                    self._leaked += max(0, min(ch.released, w.end) - w.start)
                    ch.redactions.append((w.start, w.end))
                    if ch.tool:
                        ch.redact_all = True
                    ch.settled = w.end
                    ch.context_floor = w.end
                    ch.buffer.exclude_context_before(w.end)
        self.actions.append(Notify("verdict", _event(st.index, w, flag, took, error, ch.key)))
        if flag is not None:
            self.actions.append(Notify("flag", flag))

    def _on_input_verdict(self, outcome: Verdict | BaseException, took: float) -> None:
        self._input_pending = False
        window = Window(-1, 0, self._input_chars, 0, "")
        if isinstance(outcome, BaseException):
            self.actions.append(Notify("verdict", _event(-1, window, None, took, outcome, "input")))
            if self.policy.on_error == "fail_closed":
                # The input has no clean verdict: no output goes out, whatever its own verdicts.
                self._fail(_moderation_error(outcome, "input moderation failed"), release=False)
                return
            self._unmoderated.append(Span(-1, 0, self._input_chars, repr(outcome), "input"))
            return
        decision = self.policy.judge(outcome)
        flag: Flag | None = None
        if decision is not None:
            flag = Flag(
                choice=-1,
                start=0,
                end=self._input_chars,
                context_start=0,
                category=decision.category,
                score=decision.score,
                categories=dict(decision.categories),
                scores=dict(decision.scores),
                action="cutoff",
                source="input",
                channel="input",
            )
            self._flags.append(flag)
            self._input_flagged = True
            for st in self._choices.values():
                self._cut(st, None, 0)
            for index in range(self._n):
                if index not in self._choices:
                    st = self._choices[index] = ChoiceState(index, self._template)
                    self._cut(st, None, 0)
        self.actions.append(Notify("verdict", _event(-1, window, flag, took, None, "input")))
        if flag is not None:
            self.actions.append(Notify("flag", flag))

    def _cut(self, st: ChoiceState, ch: Channel | None, at: int) -> None:
        """End ``st`` as content_filter: nothing of ``ch`` past ``at`` is released (of others:
        what already has a clean verdict and comes before the cut in order)."""
        if st.cut:
            return
        st.cut = True
        st.finish_reason = "content_filter"
        self._count_unwindowed(st)
        if self._upstream_error is not None:
            # Upstream failed first: the stream ends once, with that error (no content_filter too).
            st.cut_sent = True
            st.after_failure = True
        for other in st.channels.values():
            if other is ch or ch is None:
                other.settled = max(other.released, min(other.settled, at if other is ch else other.released))
            other.pending.clear()
            other.results.clear()
        stale = [t for t, (c, _) in self._tickets.items() if c.choice == st.index]
        for t in stale:
            del self._tickets[t]

    # -- releasing ---------------------------------------------------------------------------

    def _release_all(self) -> None:
        if self.finished:
            return
        if self._input_pending and self._holdback:
            self._maybe_finish()
            return  # no output before the input verdict
        progressed = True
        while progressed:
            progressed = False
            bound = self._loose[0].seq if self._loose else None
            for st in self._choices.values():
                if st.items or (st.cut and not st.cut_sent):
                    progressed |= self._release_choice(st, bound)
            while self._loose and self._loose[0].seq < self._oldest_held():
                item = self._loose.popleft()
                self.actions.append(Release(item.original, None, None))
                progressed = True
        self._maybe_finish()

    def _oldest_held(self) -> float:
        oldest = float("inf")
        for st in self._choices.values():
            if st.items and st.items[0].seq < oldest:
                oldest = st.items[0].seq
        return oldest

    def _limit(self, st: ChoiceState, ch: Channel) -> int:
        if self._holdback or st.cut or self._error is not None:
            return ch.settled
        return ch.buffer.total

    def _release_choice(self, st: ChoiceState, bound: int | None) -> bool:
        """Send what of ``st`` may go now; True if anything went."""
        progressed = False
        items = st.items
        cut = st.cut
        fast = not cut and self._error is None
        holdback = self._holdback
        actions = self.actions
        while items:
            item = items[0]
            if bound is not None and item.seq > bound and not cut:
                break
            pieces = item.pieces
            if fast and len(pieces) == 1 and item.finish is None and not item.opens:
                # The hot path: one whole clean text delta goes out as it came in.
                piece = pieces[0]
                ch = piece.channel
                if (
                    not ch.tool
                    and piece.end <= (ch.settled if holdback else ch.buffer.total)
                    and not ch.redactions
                    and not ch.redact_all
                    and ch.released <= piece.start
                ):
                    items.popleft()
                    self._held -= item.size
                    ch.released = piece.end
                    self._released_chars += piece.end - piece.start
                    ch.shown.append(piece.text)
                    ch.shown_size += piece.end - piece.start
                    if ch.shown_size > _SHOWN_BATCH:
                        self._count_shown(ch)
                    actions.append(Release(item.original, None, item.choice))
                    progressed = True
                    continue
            if not self._ready(st, item):
                if cut or self._partial_ok(st, item):
                    progressed |= self._emit(st, item, partial=True)
                if not cut:
                    break
                # After a cut, nothing past the first item that cannot go whole goes out.
                items.popleft()
                self._forget(item)
                for rest in items:
                    self._forget(rest)
                items.clear()
                break
            items.popleft()
            self._forget(item)
            progressed |= self._emit(st, item, partial=False)
        if cut and not st.cut_sent:
            st.cut_sent = True
            self.actions.append(CutFinish(st.index, st.template))
            progressed = True
        return progressed

    def _forget(self, item: Item) -> None:
        """``item`` left (released or dropped): its text no longer counts as held."""
        self._held -= item.size
        self._held_tool -= item.tool_size
        item.size = item.tool_size = 0

    def _ready(self, st: ChoiceState, item: Item) -> bool:
        for piece in item.pieces:
            ch = piece.channel
            if ch.tool:
                if not ch.complete:
                    return False
            elif piece.end > self._limit(st, ch):
                return False
        for ch in item.opens:
            if not ch.complete:
                return False
        if item.finish is not None and not st.cut:
            # A finish waits for every verdict of its choice.
            for ch in st.channels.values():
                if ch.pending or ch.settled < ch.buffer.total:
                    return False
        return True

    def _partial_ok(self, st: ChoiceState, item: Item) -> bool:
        """A delta longer than a window goes out in parts as its windows settle."""
        if len(item.pieces) != 1 or item.opens:
            return False
        piece = item.pieces[0]
        ch = piece.channel
        if ch.tool or piece.end - piece.start <= self.policy.window_chars:
            return False
        return max(piece.start, ch.released) < self._limit(st, ch)

    def _emit(self, st: ChoiceState, item: Item, *, partial: bool) -> bool:
        """Release ``item`` whole, or (``partial``) what of it is settled; True if anything went."""
        pieces = item.pieces
        if not partial and len(pieces) == 1 and not item.opens and not st.cut:
            piece = pieces[0]
            ch = piece.channel
            if not ch.redactions and not ch.redact_all and not ch.tool and ch.released <= piece.start:
                ch.released = piece.end
                self._released_chars += piece.end - piece.start
                ch.shown.append(piece.text)
                ch.shown_size += piece.end - piece.start
                if ch.shown_size > _SHOWN_BATCH:
                    self._count_shown(ch)
                self.actions.append(Release(item.original, None, item.choice))
                return True
        texts: dict[tuple[str, str], str] = {}
        drop: set[str] = set()
        changed = partial
        shown = 0
        for piece in item.pieces:
            ch = piece.channel
            if ch.tool and not ch.complete:
                drop.add(ch.key)
                changed = True
                continue
            lo = max(piece.start, ch.released)
            hi = min(piece.end, self._limit(st, ch)) if partial else piece.end
            if hi < lo:
                hi = lo
            if ch.redact_all:
                text = json.dumps(self.policy.redaction) if piece.start == 0 else ""
                texts[(ch.key, piece.field)] = text
                ch.released = max(ch.released, hi)
                changed = True
                continue
            spans = [r for r in ch.redactions if r[0] < hi and r[1] > lo] if ch.redactions else None
            if lo == piece.start and hi == piece.end and not spans:
                text = piece.text
            else:
                text = _redact(piece.text[lo - piece.start : hi - piece.start], lo, spans, self.policy.redaction)
                changed = True
            texts[(ch.key, piece.field)] = text
            ch.released = max(ch.released, hi)
            if spans:
                ch.redactions = [r for r in ch.redactions if r[1] > hi]
            shown += hi - lo
            if text:
                ch.shown.append(text)
                ch.shown_size += len(text)
                if ch.shown_size > _SHOWN_BATCH:
                    self._count_shown(ch)
        for ch in item.opens:
            if not ch.complete:
                drop.add(ch.key)
                changed = True
        if partial:
            # The rest of a partly released item waits in place.
            item.pieces = [p for p in item.pieces if p.channel.released < p.end and p.channel.key not in drop]
            item.size -= shown
            self._held -= shown
        self._released_chars += shown
        finish = item.finish if not partial and not st.cut else None
        if finish != item.finish:
            changed = True
        if not changed:
            self.actions.append(Release(item.original, None, item.choice))
            return True
        if finish is None and not any(texts.values()):
            return False  # nothing left to say (e.g. a finish replaced by the cut's own)
        assert item.choice is not None
        self.actions.append(Release(item.original, Edit(item.choice, texts, frozenset(drop), finish), item.choice))
        return True

    # -- ending ------------------------------------------------------------------------------

    def _fail(self, error: BaseException, *, release: bool = True) -> None:
        if self.finished or self._error is not None:
            return
        self._error = error
        if not release:
            self._input_pending = True  # holds every output back in _release_all
        # Release what already has a clean verdict, then stop.
        for st in self._choices.values():
            if not st.cut:
                self._count_unwindowed(st)
            for ch in st.channels.values():
                ch.pending.clear()
                ch.results.clear()
        self._tickets.clear()
        self._release_all()
        for st in self._choices.values():
            for item in st.items:
                self._forget(item)
            st.items.clear()
        self._finish(error)

    def _maybe_finish(self) -> None:
        if self.finished or self._error is not None:
            return
        states = self._choices.values()
        all_cut = (
            bool(self._choices)
            and (self._input_flagged or len(self._choices) >= self._n)
            and all(s.cut or s.finished for s in states)
            and any(s.cut for s in states)
        )
        if all_cut and not self._upstream_done:
            self._upstream_done = True
            self._paused_at = None
            self._close()
        if not self._upstream_done or self._input_pending:
            return
        if self._loose or any(s.items or (not s.cut and any(c.pending for c in s.channels.values())) for s in states):
            return
        if any(s.cut and not s.cut_sent for s in states):
            return
        if self.policy.include_usage and not self.upstream_usage and self._template is not None:
            template = next((s.template for s in states), self._template)
            self.actions.append(EmitUsage(template))
        self._finish(self._upstream_error_if_raised())

    def _upstream_error_if_raised(self) -> BaseException | None:
        """Upstream's error, unless every choice was cut before it failed (then it was closed by us)."""
        states = self._choices.values()
        if self._upstream_error is not None and not (states and all(s.cut and not s.after_failure for s in states)):
            return self._upstream_error
        return None

    def _close(self) -> None:
        if not self._close_sent:
            self._close_sent = True
            self.actions.append(CloseUpstream())

    def _finish(self, error: BaseException | None) -> None:
        if self.finished:
            return
        self._close()
        self.finished = True
        self.actions.append(Finished(error))

    def _update_pause(self, now: float) -> None:
        if self._held >= self.max_held and not self._upstream_done and not self.finished:
            if self._paused_at is None:
                self._paused_at = now
        elif self._paused_at is not None:
            self.paused_seconds += max(0.0, now - self._paused_at)
            self._paused_at = None
            self._last_text = now  # reading resumes: idle time counts from here


def _event(
    choice: int, w: Window, flag: Flag | None, took: float, error: BaseException | None, channel: str
) -> VerdictEvent:
    return VerdictEvent(choice, w.seq, w.start, w.end, w.text, flag, took, error, channel)


def _moderation_error(outcome: BaseException, what: str) -> ModerationError:
    """``outcome`` as the ModerationError a fail-closed stream ends with (raised from the cause)."""
    if isinstance(outcome, ModerationError):
        return outcome
    failure = ModerationError(f"{what}: {outcome!r}")
    failure.__cause__ = outcome
    return failure


def _redact(text: str, offset: int, spans: list[tuple[int, int]] | None, redaction: str) -> str:
    """Replace what of ``text`` (which starts at ``offset``) lies inside ``spans``.

    The redaction text goes where a span starts, so a span split over several deltas is replaced once.
    """
    if not spans:
        return text
    end = offset + len(text)
    out, pos = [], offset
    for s, e in sorted(spans):
        cs, ce = max(s, pos), min(e, end)
        if cs >= ce:
            continue
        out.append(text[pos - offset : cs - offset])
        if cs == s:
            out.append(redaction)
        pos = ce
    out.append(text[pos - offset :])
    return "".join(out)
