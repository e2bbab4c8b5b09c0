"""The UI-free core of bulk labeling: one module per concept.

Each function takes a FiftyOne collection and plain values, does the bulk
database work server-side, and returns a small JSON-able result.
"""
