"""What a model is: model families and their axis map (``families``), shapes
and parameter counts (``shapes``), and the in-memory anchor (``anchor``)."""
