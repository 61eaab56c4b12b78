pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "herald-android-sample"
// :herald wraps the generated Kotlin binding and the cargo-ndk libraries of this
// repository (bindings/build-android.sh); :app is the sample.
include(":herald", ":app")
