//! meanflow-repro: reproduces "Mean Flows for One-step Generative Modeling" on tch (libtorch).
//! See README.md for the flow of data and the `mfr` commands.
pub mod assets;
pub mod bench;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
mod ffi;
pub mod files;
pub mod imf;
pub mod import;
pub mod meanflow;
pub mod method;
pub mod model;
pub mod paths;
pub mod pipeline;
pub mod progress;
pub mod readfile;
pub mod report;
pub mod rundir;
pub mod settings;
pub mod signals;
pub mod spec;
pub mod tensorfile;
pub mod train;
