//! Reading weight files made by PyTorch code.
pub mod torch_file;
