// The client has one source, the file fastws serves at /fastws.js: this re-exports it, so
// Node code imports the very module browsers get from the server.
export * from "../../src/fastws/static/fastws.js";
export { default } from "../../src/fastws/static/fastws.js";
