"""HTTP ``Accept`` negotiation (RFC 9110 §12.5.1): q-values, wildcards, most specific match wins."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    q: float
    params: tuple[tuple[str, str], ...] = ()

    def matches(self, media_type: str) -> int:
        """Specificity of the match (3 exact, 2 type/*, 1 */*), or 0 for none."""
        kind, _, sub = media_type.partition("/")
        if self.type == "*":
            return 1
        if self.type != kind:
            return 0
        if self.subtype == "*":
            return 2
        return 3 if self.subtype == sub else 0


class MalformedAccept(ValueError):
    pass


def parse_accept(header: str) -> list[MediaRange]:
    """Ranges in the header; malformed ones are skipped, all-malformed raises MalformedAccept."""
    ranges: list[MediaRange] = []
    parts = [p.strip() for p in header.split(",") if p.strip()]
    for part in parts:
        media, *raw_params = [s.strip() for s in part.split(";")]
        kind, slash, sub = media.lower().partition("/")
        if not slash or not kind or not sub or (kind == "*" and sub != "*"):
            continue
        q = 1.0
        params: list[tuple[str, str]] = []
        ok = True
        for raw in raw_params:
            key, eq, value = raw.partition("=")
            key = key.strip().lower()
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    ok = False
                    break
                if not 0.0 <= q <= 1.0:
                    ok = False
                    break
            elif eq:
                params.append((key, value.strip().strip('"')))
        if ok:
            ranges.append(MediaRange(kind, sub, q, tuple(params)))
    if parts and not ranges:
        raise MalformedAccept(f"Accept header {header[:200]!r} has no valid media range")
    return ranges


def quality(ranges: list[MediaRange], media_type: str) -> float:
    best, best_q = 0, 0.0
    for r in ranges:
        spec = r.matches(media_type)
        if spec > best:
            best, best_q = spec, r.q
    return best_q if best else 0.0


def choose(header: str | None, offers: list[str]) -> str | None:
    """The offer the client prefers; on a tie the earlier offer (the server's preference).

    No header means anything is fine. Returns None when nothing offered is acceptable.
    """
    if not offers:
        return None
    if header is None or not header.strip():
        return offers[0]
    ranges = parse_accept(header)
    scored = [(quality(ranges, offer), -i, offer) for i, offer in enumerate(offers)]
    q, _, offer = max(scored)
    return offer if q > 0 else None
