pub mod cluster;
pub mod profile;
