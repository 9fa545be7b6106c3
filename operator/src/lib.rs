//! kandle-operator: the `LanguageModel` API types and its controller (being built).
