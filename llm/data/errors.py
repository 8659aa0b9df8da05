"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A data problem, phrased as one line that names the file, field or config key."""
