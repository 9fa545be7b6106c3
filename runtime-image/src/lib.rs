//! kandle-runtime: the candle inference server (being built).
