"""Feature data: MATLAB file I/O and readers for decoded / true CNN feature layouts."""
