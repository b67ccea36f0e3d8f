//! Where ClusterState comes from: the Docker Engine API.
pub mod docker;
pub mod docker_api;
pub mod managers;
pub mod netns;
