//! Placeholder: the streaming .npz reader.
