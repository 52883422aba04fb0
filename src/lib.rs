pub mod cluster;
pub mod model;
pub mod profile;
pub mod repo;
