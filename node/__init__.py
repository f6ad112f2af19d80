"""segnode: the DICOM-native AI node (receive, route, execute, dispatch, audit)."""

__version__ = "0.1.0"
