__all__ = ['ttypes', 'constants', 'otsapi']
